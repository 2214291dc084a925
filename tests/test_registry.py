"""The pack as the Comfy Registry and the ecosystem's tools see it.

* pyproject.toml against the Registry's specification, and LICENSE against the licence it declares (no tool needed);
* ``comfy node validate`` and ``comfy node pack`` (comfy-cli): the Registry's publishing checks, and what the node
  archive holds;
* ``comfy-import-guard check``: every ``comfy.*`` name the pack uses exists, and every call binds, in the ComfyUI
  source at ``COMFYUI_DIR`` (static; ComfyUI is not started).

The tools run on a copy of the pack's files (what git tracks, plus new files git does not ignore), so nothing is
written into the repository. Each test is skipped, with the reason, where its tool is not installed
(``pip install comfy-cli comfy-import-guard``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-InstantCharacter"
RUNTIME = ("__init__.py", "install.py", "requirements.txt", "pyproject.toml", "LICENSE", "README.md")
RUNTIME_FOLDERS = ("nodes/", "instantcharacter/", "workflows/", "assets/", "docs/")
LEFT_OUT = ("tests/", ".ci/", "benchmarks/")
# comfy-cli 1.23's lists (comfy_cli/registry/config_parser.py)
REGISTRY_OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def _tool(name: str) -> str | None:
    """A console script of the Python running the tests, else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DO_NOT_TRACK="1", COMFY_NO_TELEMETRY="1", NO_COLOR="1", COLUMNS="200")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# ---- no tool needed -------------------------------------------------------------------------------------------


def test_pyproject_fills_the_registry_fields_and_matches_requirements():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"]) and not re.search(r"[._-]{2}",
                                                                                          project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"]
    classifiers = project["classifiers"]
    systems = [c.split(" :: ", 1)[1] for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.split(" :: ", 1)[1] for c in classifiers if c.startswith("Environment ::")]
    assert systems and all(s.startswith(REGISTRY_OS_PREFIXES) for s in systems)
    assert accelerators == ["GPU :: NVIDIA CUDA"] and set(accelerators) <= REGISTRY_ACCELERATORS
    parts = [p.strip() for p in comfy["requires-comfyui"].split(",")]
    assert all(VERSION_PART.match(p) for p in parts)
    assert comfy["requires-comfyui"] == ">=0.3.64"  # the oldest ComfyUI the host tests run on
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # no field left empty, no placeholder address
    strings = [v for v in comfy.values() if isinstance(v, str)] + list(project.get("urls", {}).values())
    assert all(s.strip() for s in strings)
    assert all(u.startswith("https://") for u in project.get("urls", {}).values())
    requirements = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert project["dependencies"] == [r for r in requirements if r]


def test_license_file_is_the_declared_apache_2_licence():
    declared = _pyproject()["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    for clause in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                   "4. Redistribution.", "9. Accepting Warranty or Additional Liability.",
                   "END OF TERMS AND CONDITIONS", "http://www.apache.org/licenses/LICENSE-2.0"):
        assert clause in text, clause
    assert len(text.splitlines()) == 202  # the whole standard text, not an excerpt


def test_no_exec_or_eval_anywhere_in_the_repository():
    """What ``comfy node validate`` flags (ruff S102 / S307), checked with the standard library where ruff is not
    installed: no call to the builtins exec or eval in any Python file."""
    import ast

    offenders = []
    for path in _pack_files():
        if path.endswith(".py"):
            tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
            offenders += [f"{path}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Call)
                          and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval")]
    assert not offenders, offenders


# ---- the tools ------------------------------------------------------------------------------------------------


def _pack_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("the pack's files are listed by git: run the tests in a git checkout with git installed")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def pack_copy(tmp_path_factory) -> Path:
    """The pack's files in a fresh git repository of their own (comfy node pack archives what git lists)."""
    copy = tmp_path_factory.mktemp("pack") / PACK_NAME
    for name in _pack_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    return copy


def _comfy_cli() -> str:
    comfy = _tool("comfy")
    if comfy is None:
        pytest.skip("comfy-cli is not installed (pip install comfy-cli)")
    return comfy


def test_comfy_node_validate_is_clean(pack_copy):
    result = _run([_comfy_cli(), "--skip-prompt", "--no-json", "node", "validate"], pack_copy)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
    assert "All validation checks passed successfully" in output
    assert "Warning" not in output and "Security warnings" not in output, output


def test_the_registry_archive_holds_what_comfyui_needs_and_no_tests(pack_copy):
    result = _run([_comfy_cli(), "--skip-prompt", "--no-json", "node", "pack"], pack_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(pack_copy / "node.zip") as archive:
        names = set(archive.namelist())
    tracked = set(_pack_files())
    needed = {n for n in tracked if n in RUNTIME or n.startswith(RUNTIME_FOLDERS)}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.startswith(LEFT_OUT)], sorted(n for n in names if n.startswith(LEFT_OUT))
    # the pictures the shipped workflows load are there
    for workflow in (ROOT / "workflows").glob("*.json"):
        for node in json.loads(workflow.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                assert f"assets/{node['widgets_values'][0]}" in names, (workflow.name, node["widgets_values"][0])
    print(f"node.zip: {len(names)} files")


def test_comfy_import_guard_finds_every_comfy_name_the_pack_uses(pack_copy, tmp_path):
    guard = _tool("comfy-import-guard")
    if guard is None:
        pytest.skip("comfy-import-guard is not installed (pip install comfy-import-guard)")
    comfyui = os.environ.get("COMFYUI_DIR")
    if not comfyui or not (Path(comfyui) / "main.py").is_file():
        pytest.skip("COMFYUI_DIR is not set to a ComfyUI checkout (the guard checks the pack against its source)")
    # The guard reads ComfyUI through git: make a repository of this ComfyUI's source, tagged with its version.
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (Path(comfyui) / "comfyui_version.py").read_text())[1]
    clone = tmp_path / "cache" / "ComfyUI"
    clone.mkdir(parents=True)
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=clone, check=True)
    subprocess.run([*git, f"--work-tree={comfyui}", "add", "-A", "."], cwd=clone, check=True)
    subprocess.run([*git, f"--work-tree={comfyui}", "commit", "-q", "-m", version], cwd=clone, check=True)
    subprocess.run([*git, "tag", f"v{version}"], cwd=clone, check=True)
    subprocess.run([*git, "checkout", "-q", "-f", f"v{version}"], cwd=clone, check=True)
    install = tmp_path / "install" / "custom_nodes"
    install.mkdir(parents=True)
    (install / PACK_NAME).symlink_to(pack_copy, target_is_directory=True)

    args = [guard, "check", "--comfy-dir", str(install.parent), "--cache-dir", str(tmp_path / "cache"), "--offline",
            "--target", f"v{version}", "--strict"]
    printed = _run(args, tmp_path)
    print(printed.stdout + printed.stderr)
    report = json.loads(_run([*args, "--json", "--quiet"], tmp_path).stdout)
    assert printed.returncode == 0, printed.stdout + printed.stderr
    assert report["totals"]["will_break"] == 0 and report["totals"]["warn"] == 0, report["totals"]
    packs = {p["pack"]: p for p in report["packs"]}
    assert packs[PACK_NAME]["verdict"] == "SAFE", packs[PACK_NAME]
    assert not packs[PACK_NAME]["unparseable"] and packs[PACK_NAME]["references"] > 100
    assert "SAFE" in printed.stdout and f"v{version}" in printed.stdout
