"""The native-path benchmark's smoke run (``--small``: tiny widths on the CPU; the real run needs a GPU) and its
full-size build: ComfyUI's own FLUX.1-dev (11.9 B parameters) and the published adapter, on ``meta``."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from comfyui import comfyui_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "native_overhead.py"


def test_small_run_prints_every_row(tmp_path):
    out = tmp_path / "native.md"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, str(SCRIPT), "--small", "--repeats", "1", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, COMFYUI_DIR=str(comfyui_dir())))
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| 64² |")]
    assert len(rows) == 2  # batch 1 and 4
    for row in rows:
        plain, patched, ratio, floor = (float(v) for v in row[2:6])
        assert plain > 0 and patched > 0 and ratio > 0 and floor > 1  # the character adds work
    assert "CPU" in table.splitlines()[0]  # it says what it ran on
    split = [line for line in table.splitlines() if line.startswith("| CFG split")]
    assert split and all("ms/step" in line or "no MultiGPU" in line for line in split)


def test_full_size_build_is_flux_dev_and_the_published_adapter(comfy, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("native_overhead", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    meta = torch.device("meta")
    flux = bench.flux_patcher(bench.FULL, torch.bfloat16, meta).model.diffusion_model
    adapter = bench.adapter_model(bench.FULL, torch.bfloat16, meta)
    blocks = sum(p.numel() for b in (*flux.double_blocks, *flux.single_blocks) for p in b.parameters())
    assert (len(flux.double_blocks), len(flux.single_blocks), flux.hidden_size) == (19, 38, 3072)
    assert abs(sum(p.numel() for p in flux.parameters()) - 11.90e9) < 0.01e9 and blocks > 11.5e9
    assert sum(p.numel() for p in adapter.parameters()) == 2_794_932_864  # the published file's
