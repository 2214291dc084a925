"""Command line: ``python -m instantcharacter generate|doctor``.

``generate`` runs the same code as the ComfyUI nodes without ComfyUI; ``doctor`` reports the machine,
the model files and the offload setting to use (``--selftest`` runs a tiny random end-to-end).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from .files import hub
from .errors import InputError, InstantCharacterError
from .files.locations import CHARACTERS_SUBDIR, character_file, default_models_dir, locate_all

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_REFERENCE = ASSETS / "reference_girl.png"
log = logging.getLogger("instantcharacter")


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", type=Path, action="append",
                   help=f"reference picture of the character (repeat for several views); default {BUNDLED_REFERENCE.name}")
    p.add_argument("--character", type=Path, default=None,
                   help=f"a saved character file instead of --reference (a path, or a name in the models folder's "
                        f"{CHARACTERS_SUBDIR.as_posix()}); the image encoders are then not needed")
    p.add_argument("--save-character", type=Path, default=None,
                   help="also save the character as this .safetensors file (for --character or Load Character)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --save-character replace an existing character file (never any other file)")
    p.add_argument("--prompt", default="a character standing in a sunlit forest, detailed illustration")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--true-cfg", type=float, default=1.0, help="> 1 with a negative prompt runs true CFG")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=123456)
    p.add_argument("--subject-scale", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--fit", choices=("stretch", "pad", "crop"), default="stretch")
    p.add_argument("--offload", choices=("auto", "off", "budget", "sequential"), default="auto",
                   help="auto picks from the free VRAM (what `doctor` reports)")
    p.add_argument("--vram-budget", type=float, default=None, help="GiB (what nvidia-smi calls GB) for --offload budget")
    p.add_argument("--fp8", action="store_true", help="store transformer weights as fp8 (compute in bf16)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--output-dir", type=Path, default=Path("output"))


def _paths(args, needed: tuple[str, ...]) -> dict[str, Path]:
    """The model paths ``needed`` (keys of :func:`locate_all`), downloaded with --download when missing."""
    models_dir = args.models_dir or default_models_dir()
    found = {name: loc for name, loc in locate_all(models_dir).items() if name in needed}
    missing = [loc for loc in found.values() if not loc.present]
    if missing and args.download:
        for loc in missing:
            print(f"downloading {loc.model.repo_id} ({loc.model.size}) into {loc.path} …", flush=True)
            dest = loc.path.parent if loc.model is hub.ADAPTER else loc.path
            hub.download(loc.model, dest)
        found = {name: loc for name, loc in locate_all(models_dir).items() if name in needed}
        missing = [loc for loc in found.values() if not loc.present]
    if missing:
        lines = "\n".join(f"  {loc.model.repo_id}: {loc.detail} → {loc.path}" for loc in missing)
        raise InstantCharacterError(
            f"Models not found under {models_dir}:\n{lines}\nRun again with --download, pass --models-dir, "
            "or put the files there by hand (see README, 'Model files')."
        )
    return {name: loc.path for name, loc in found.items()}


def _open_reference(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        what = "a folder" if path.is_dir() else "not found"
        raise InputError(f"--reference {path}: {what}; give a picture file (PNG, JPEG, WebP …).")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"--reference {path} is not a picture that can be read ({err}).") from err
    return image


def cmd_generate(args) -> int:
    import torch
    from PIL import Image

    from .files.adapter_file import load_adapter
    from .files.character_file import check_save_path, load_character, save_character
    from .files.encoders import load_reference_encoders
    from .files.flux import load_flux
    from .run.pipeline import GenerationSettings, MemorySettings, generate

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
        images = [_open_reference(p) for p in (args.reference or [BUNDLED_REFERENCE])]
    needed = ("flux", "adapter") if saved is not None else ("flux", "siglip", "dinov2", "adapter")
    paths = args.paths if hasattr(args, "paths") else _paths(args, needed)
    dtype = _dtype(args.dtype)
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

    def progress(step, total):
        # one line rewritten in a terminal; a line per step in a log file or pipe
        print(f"\rstep {step}/{total}" if interactive else f"step {step}/{total}",
              end="" if interactive and step < total else "\n", flush=True)

    result = generate(flux, adapter, features, settings, memory, step_callback=progress)
    streamed = f", {result.bytes_streamed / 2**30:.1f} GiB streamed" if result.bytes_streamed else ""
    print(f"placement: {result.offload}{streamed}; VAE decode {result.decode}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(result.images):
        out = args.output_dir / f"instantcharacter_{args.seed}_{i:02d}.png"
        Image.fromarray((img.numpy() * 255).round().astype("uint8")).save(out)
        print(f"wrote {out}")
    return 0


def _selftest(args) -> int:
    from .testing.tiny import write_tiny_models

    print("selftest: tiny RANDOM models (not the real weights; the pictures are noise by design)")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tiny_models(Path(tmp) / "models")
        ns = argparse.Namespace(paths=paths, reference=None, prompt="a test character", negative_prompt="blurry",
                                true_cfg=1.5, width=64, height=64, steps=2, guidance=3.5, seed=1,
                                subject_scale=0.9, batch_size=2, fit="pad", offload="auto", vram_budget=None,
                                fp8=False, dtype="fp32",
                                output_dir=Path(tmp) / "out")
        cmd_generate(ns)
        written = sorted((Path(tmp) / "out").glob("*.png"))
        ok = len(written) == 2
        print(f"selftest {'passed' if ok else 'FAILED'}: {len(written)} images of 64×64 from the full code path")
        return 0 if ok else 1


def cmd_doctor(args) -> int:
    import torch

    from .run.memory import recommend_offload

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    for lib in ("diffusers", "transformers", "huggingface_hub", "safetensors"):
        try:
            module = __import__(lib)
            print(f"{lib} {module.__version__}")
        except ImportError:
            print(f"{lib}: NOT INSTALLED (run install.py)")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"GPU: {torch.cuda.get_device_name(0)}, {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free")
    else:
        print("GPU: none found (CUDA unavailable); generation would run on the CPU, very slowly")
    mode, why = recommend_offload()
    print(f"recommended offload: {mode} ({why})")
    models_dir = args.models_dir or default_models_dir()
    print(f"models folder: {models_dir.resolve()}")
    for loc in locate_all(models_dir).values():
        state = "ok" if loc.present else loc.detail.split(":")[0]
        detail = "" if loc.present or ":" not in loc.detail else f" ({loc.detail.split(':', 1)[1].strip()})"
        print(f"  [{state}] {loc.model.repo_id} ({loc.model.size}) → {loc.path}{detail}")
    return _selftest(args) if args.selftest else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instantcharacter", description=__doc__)
    models_help = "ComfyUI models folder (default: COMFYUI_MODELS_DIR, the ComfyUI this pack is in, or ./models)"
    parser.add_argument("--models-dir", type=Path, default=None, help=models_help)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate pictures of a character")
    _add_generation_args(gen)
    gen.add_argument("--download", action="store_true", help="download missing models (FLUX.1-dev needs HF_TOKEN)")
    doc = sub.add_parser("doctor", help="check the machine and the model files")
    doc.add_argument("--selftest", action="store_true", help="run a tiny random end-to-end generation")
    for command in (gen, doc):  # accepted after the command too; SUPPRESS keeps a value given before it
        command.add_argument("--models-dir", type=Path, default=argparse.SUPPRESS, help=models_help)
    args = parser.parse_args(argv)
    if args.command == "generate" and args.character is not None and args.reference:
        parser.error("--character and --reference both give the character: use one")
    if args.command == "generate" and args.offload == "budget" and args.vram_budget is None:
        parser.error("--offload budget needs --vram-budget GiB (the VRAM the run may use)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_generate(args) if args.command == "generate" else cmd_doctor(args)
    except InstantCharacterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
