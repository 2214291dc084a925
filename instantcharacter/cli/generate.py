"""``generate``: pictures of a character from a reference picture (or a saved character), the same code as the
ComfyUI nodes without ComfyUI."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..files.locations import character_file, default_models_dir
from .common import BUNDLED_REFERENCE, add_character_args, dtype_of, model_paths, open_reference


def add_generation_args(p: argparse.ArgumentParser) -> None:
    add_character_args(p, "; the image encoders are then not needed")
    p.add_argument("--save-character", type=Path, default=None,
                   help="also save the character as this .safetensors file (for --character or Load Character)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --save-character replace an existing character file (never any other file)")
    p.add_argument("--prompt", default="a character standing in a sunlit forest, detailed illustration",
                   help="what to show the character doing, and where")
    p.add_argument("--negative-prompt", default=None,
                   help="what to keep out of the picture (used with --true-cfg above 1); default: none")
    p.add_argument("--true-cfg", type=float, default=1.0,
                   help="true CFG scale: above 1 with --negative-prompt runs a second, negative pass per step")
    p.add_argument("--width", type=int, default=1024, help="picture width in pixels, a multiple of 16")
    p.add_argument("--height", type=int, default=1024, help="picture height in pixels, a multiple of 16")
    p.add_argument("--steps", type=int, default=28, help="denoising steps")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev's distilled guidance")
    p.add_argument("--seed", type=int, default=123456, help="noise seed: the same seed gives the same picture")
    p.add_argument("--subject-scale", type=float, default=0.9, help="how strongly the character acts")
    p.add_argument("--batch-size", type=int, default=1,
                   help="pictures per run (their noise drawn together from --seed)")
    p.add_argument("--fit", choices=("stretch", "pad", "crop"), default="stretch",
                   help="how a non-square reference becomes square: stretch (as the official code), pad with "
                        "white, or crop the middle")
    p.add_argument("--offload", choices=("auto", "off", "budget", "sequential"), default="auto",
                   help="where the models stay during the run; auto picks from the free VRAM (what `doctor` "
                        "reports)")
    p.add_argument("--vram-budget", type=float, default=None,
                   help="GiB (what nvidia-smi calls GB) the run may use with --offload budget; needed there")
    p.add_argument("--fp8", action="store_true",
                   help="store the transformer weights as fp8 (compute in bf16): half the memory to hold or stream")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight and compute dtype")
    p.add_argument("--output-dir", type=Path, default=Path("output"), help="where the pictures are written")


def cmd_generate(args) -> int:
    import torch
    from PIL import Image

    from ..files.adapter_file import load_adapter
    from ..files.character_file import check_save_path, load_character, save_character
    from ..files.encoder_files import load_reference_encoders
    from ..files.flux import load_flux
    from ..run.pipeline import generate
    from ..run.settings import GenerationSettings, MemorySettings, RunHooks

    # everything the user typed is checked before any model is looked for, downloaded or loaded
    settings = GenerationSettings(args.prompt, negative_prompt=args.negative_prompt, true_cfg=args.true_cfg,
                                  width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                                  seed=args.seed, subject_scale=args.subject_scale, batch_size=args.batch_size)
    memory = MemorySettings(args.offload, args.vram_budget, args.fp8)
    settings.check()
    memory.check()
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"--output-dir {args.output_dir} is a file, not a folder: give a folder for the pictures.")
    save_to = getattr(args, "save_character", None)
    if save_to is not None:  # a folder, a file in the way, no permission, an existing file: before any encoder runs
        check_save_path(save_to, getattr(args, "overwrite", False))
    saved = getattr(args, "character", None)
    if saved is not None:
        features = load_character(character_file(args.models_dir or default_models_dir(), saved))
    else:
        images = [open_reference(p) for p in (args.reference or [BUNDLED_REFERENCE])]
    needed = ("flux", "adapter") if saved is not None else ("flux", "siglip", "dinov2", "adapter")
    paths = args.paths if hasattr(args, "paths") else model_paths(args, needed)
    dtype = dtype_of(args.dtype)
    offload = args.offload
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    if saved is None:
        encoders = load_reference_encoders(paths["siglip"], paths["dinov2"], dtype=dtype).to(device)
        features = encoders.encode(images, fit=args.fit).to("cpu")
        encoders.to("cpu")
        del encoders
    if save_to is not None:
        print(f"wrote {save_character(features, save_to, overwrite=getattr(args, 'overwrite', False))}")
    adapter = load_adapter(paths["adapter"], dtype=dtype)
    flux = load_flux(paths["flux"], dtype=dtype)
    print(f"models loaded in {time.perf_counter() - started:.1f} s; offload={offload}, device={device}", flush=True)

    interactive = sys.stdout.isatty()

    def progress(step, total, _):
        # one line rewritten in a terminal; a line per step in a log file or pipe
        print(f"\rstep {step}/{total}" if interactive else f"step {step}/{total}",
              end="" if interactive and step < total else "\n", flush=True)

    result = generate(flux, adapter, features, settings, memory, hooks=RunHooks(on_step=progress))
    streamed = f", {result.bytes_streamed / 2**30:.1f} GiB streamed" if result.bytes_streamed else ""
    print(f"placement: {result.offload}{streamed}; VAE decode {result.decode}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(result.images):
        out = args.output_dir / f"instantcharacter_{args.seed}_{i:02d}.png"
        Image.fromarray((img.numpy() * 255).round().astype("uint8")).save(out)
        print(f"wrote {out}")
    return 0
