"""Loaded weights belong to the process: overwriting or truncating a model file after loading it changes
nothing and crashes nothing (safetensors and memory-mapped pickles hand out views of the file).

Each case runs in a subprocess, because touching a truncated memory-mapped file kills the process (SIGBUS).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
kind, path = sys.argv[2], sys.argv[3]
if kind == "adapter":
    from instantcharacter.files.adapter_file import load_adapter
    loaded = load_adapter(path, dtype=torch.bfloat16)  # the file's own dtype: .to() alone would copy nothing
    tensors = list(loaded.state_dict().values())
elif kind == "lora":
    from instantcharacter.files.lora_file import read_lora
    tensors = list(read_lora(path).tensors.values())
else:
    from instantcharacter.files.single_file import load_flux_transformer
    tensors = list(load_flux_transformer(path, dtype=torch.bfloat16).state_dict().values())
before = [t.float().clone() for t in tensors]
size = os.path.getsize(path)
with open(path, "r+b") as f:  # overwrite every byte after the first KiB in place, then cut the file
    f.seek(1024)
    f.write(b"\xff" * (size - 1024))
with open(path, "r+b") as f:
    f.truncate(1024)
same = all(torch.equal(a, b.float()) for a, b in zip(before, tensors))
print("unchanged" if same else "CHANGED")
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_flux):
    from instantcharacter.testing.tiny_loras import write_tiny_lora
    from instantcharacter.testing.single_file import write_flux_file
    from instantcharacter.testing.tiny import write_tiny_adapter

    root = tmp_path_factory.mktemp("owned")
    return {
        "adapter_bin": write_tiny_adapter(root / "a.bin"),
        "adapter_safetensors": write_tiny_adapter(root / "a.safetensors"),
        "lora": write_tiny_lora(root / "style.safetensors", "kohya"),
        "flux": write_flux_file(tiny_flux.transformer, root / "flux1-dev.safetensors"),
    }


@pytest.mark.parametrize("case", ["adapter_bin", "adapter_safetensors", "lora", "flux"])
def test_overwriting_or_truncating_the_file_after_loading_changes_nothing(files, case, tmp_path):
    path = tmp_path / files[case].name
    path.write_bytes(files[case].read_bytes())
    kind = case.split("_")[0]
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), kind, str(path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"exit {out.returncode} (-7 = SIGBUS)\n{out.stderr[-2000:]}"
    assert out.stdout.strip().splitlines()[-1] == "unchanged"
