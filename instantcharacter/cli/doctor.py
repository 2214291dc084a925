"""``doctor``: the machine (torch, the GPU), the model files and the offload setting to use; ``--selftest`` runs a
tiny random generation through the whole code path."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from ..files.locations import default_models_dir, locate_all
from .generate import cmd_generate


def _selftest(args) -> int:
    from ..run.quiet import libraries_quiet
    from ..testing.tiny import write_tiny_models

    print("selftest: tiny RANDOM models (not the real weights; the pictures are noise by design)")
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.nullcontext() if args.verbose else libraries_quiet() as held:
            paths = write_tiny_models(Path(tmp) / "models")
            ns = argparse.Namespace(paths=paths, reference=None, prompt="a test character", negative_prompt="blurry",
                                    true_cfg=1.5, width=64, height=64, steps=2, guidance=3.5, seed=1,
                                    subject_scale=0.9, batch_size=2, fit="pad", offload="auto", vram_budget=None,
                                    fp8=False, dtype="fp32",
                                    output_dir=Path(tmp) / "out")
            cmd_generate(ns)
        if held is not None:
            print(f"selftest: {held.summary()} (--verbose shows them)")
        written = sorted((Path(tmp) / "out").glob("*.png"))
        ok = len(written) == 2
        print(f"selftest {'passed' if ok else 'FAILED'}: {len(written)} images of 64×64 from the full code path")
        return 0 if ok else 1


def cmd_doctor(args) -> int:
    import torch

    from ..run.offload.planner import recommend_offload

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    for lib in ("diffusers", "transformers", "huggingface_hub", "safetensors"):
        try:
            module = __import__(lib)
            print(f"{lib} {module.__version__}")
        except ImportError:
            print(f"{lib}: NOT INSTALLED (run install.py)")
    free = None
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"GPU: {torch.cuda.get_device_name(0)}, {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free")
    else:
        print("GPU: none found (CUDA unavailable); generation would run on the CPU, very slowly")
    mode, why = recommend_offload(free)
    print(f"recommended offload: {mode} ({why})")
    models_dir = args.models_dir or default_models_dir()
    print(f"models folder: {models_dir.resolve()}")
    for loc in locate_all(models_dir).values():
        state = "ok" if loc.present else loc.detail.split(":")[0]
        detail = "" if loc.present or ":" not in loc.detail else f" ({loc.detail.split(':', 1)[1].strip()})"
        print(f"  [{state}] {loc.model.repo_id} ({loc.model.size}) → {loc.path}{detail}")
    return _selftest(args) if args.selftest else 0
