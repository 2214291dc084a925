"""The README's commands, as written. Every line of its ``bash`` blocks is run here, or verbatim by CI (.ci/run), or
listed in NOT_RUN with the reason no machine without a GPU, ComfyUI's own Python or the Hub can run it. A command
added to the README without one of these fails here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_SCRIPT = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
VENV_PYTHON = ".venv/bin/python"

SELFTEST = f"{VENV_PYTHON} -m instantcharacter doctor --selftest"
FIRST_RUN = f"{VENV_PYTHON} -m instantcharacter generate --download"
# run in tests/test_storyboard_cli.py with the README's story, small sizes added for the CPU
STORYBOARD = f"{VENV_PYTHON} -m instantcharacter storyboard"
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install torch":
        "PyPI's default torch is a CUDA build of several GB; CI makes .venv with the CPU torch of the test command",
}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    lines = [line.split(" #", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def _run_as_written(command: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    """``command`` from the README, with this test's Python for the README's ``.venv/bin/python``."""
    args = shlex.split(command)
    assert args[0] == VENV_PYTHON, command
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                   "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env}
    return subprocess.run([sys.executable, *args[1:]], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def test_every_readme_command_is_run_here_or_by_ci():
    commands = readme_commands()
    assert any(c.startswith(SELFTEST) for c in commands) and any(c.startswith(FIRST_RUN) for c in commands)
    unaccounted = [c for c in commands if not c.startswith((SELFTEST, FIRST_RUN, STORYBOARD)) and c not in NOT_RUN
                   and c not in CI_SCRIPT]
    assert not unaccounted, f"README commands that nothing runs (run them in a test or in .ci/run): {unaccounted}"
    assert set(NOT_RUN) <= set(commands), "NOT_RUN lists a command the README no longer has"


def test_the_readme_selftest_prints_only_our_lines(tmp_path):
    command = next(c for c in readme_commands() if c.startswith(SELFTEST))
    result = _run_as_written(command, ROOT, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "tiny RANDOM models" in out and "selftest passed: 2 images" in out
    assert "placement: off (not a CUDA device: nothing to offload); VAE decode batch" in out
    assert re.search(r"selftest: \d+ warning\(s\) from the libraries and their progress bars held back", out)
    # the libraries' warnings, log lines and progress bars are held back, on both streams
    for noise in ("Writing model shards", "Loading", "it/s]", "should be kept in float32", "[transformers]",
                  "Warning", "deprecated", "not sharded"):
        assert noise not in out and noise not in result.stderr, noise
    assert result.stderr == ""


def test_the_readme_first_run_checks_before_downloading(tmp_path):
    """Here there is no GPU and no token, and the Hub is out of reach: the first run lists every missing model
    with its size, names both problems with their fixes and stops, without a byte downloaded or a retry."""
    command = next(c for c in readme_commands() if c.startswith(FIRST_RUN))
    result = _run_as_written(command, tmp_path, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    assert "unrecognized arguments" not in result.stderr, result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    report = result.stdout.split("before downloading:\n", 1)[1].splitlines()
    assert len([line for line in report if line.strip().startswith("to download:")]) == 4
    assert "47.3 GB to download" in result.stdout
    assert "nothing was downloaded" in result.stderr and "no Hugging Face token" in result.stderr
    import torch

    assert ("no CUDA GPU" in result.stderr) == (not torch.cuda.is_available())
    assert "Retry" not in result.stderr and "retry" not in result.stderr
    assert not (tmp_path / "models").exists()
