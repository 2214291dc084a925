"""Command line: ``python -m instantcharacter generate|doctor|storyboard``.

``generate`` runs the same code as the ComfyUI nodes without ComfyUI; ``doctor`` reports the machine,
the model files and the offload setting to use (``--selftest`` runs a tiny random end-to-end);
``storyboard`` draws one character through the panels of a text file, the best of k candidates each, resumable,
here or on a Ray cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", type=Path, action="append",
                   help=f"reference picture of the character (repeat for several views); default: the bundled "
                        f"assets/{BUNDLED_REFERENCE.name}")
    p.add_argument("--character", type=Path, default=None,
                   help=f"a saved character file instead of --reference (a path, or a name in the models folder's "
                        f"{CHARACTERS_SUBDIR.as_posix()}); the image encoders are then not needed")
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


def _paths(args, needed: tuple[str, ...]) -> dict[str, Path]:
    """The model paths ``needed`` (keys of :func:`locate_all`), downloaded with --download when missing."""
    models_dir = args.models_dir or default_models_dir()
    found = {name: loc for name, loc in locate_all(models_dir).items() if name in needed}
    missing = [loc for loc in found.values() if not loc.present]
    if missing and args.download:
        _check_before_download(missing, Path(models_dir))
        for loc in missing:
            print(f"downloading {loc.model.repo_id} ({loc.model.size}) into {loc.path} …", flush=True)
            hub.download(loc.model, loc.download_folder)
        found = {name: loc for name, loc in locate_all(models_dir).items() if name in needed}
        missing = [loc for loc in found.values() if not loc.present]
    if missing:
        lines = "\n".join(f"  {loc.model.repo_id}: {loc.detail} → {loc.path}" for loc in missing)
        raise InstantCharacterError(
            f"Models not found under {models_dir}:\n{lines}\nRun again with --download, pass --models-dir, "
            "or put the files there by hand (see README, 'Model files')."
        )
    return {name: loc.path for name, loc in found.items()}


def _check_before_download(missing, models_dir: Path) -> None:
    """Say what the download needs and stop before the first byte if something is in the way."""
    from .run.first_run import check_before_download, find_gpu

    report = check_before_download(missing, models_dir, find_gpu())
    print("before downloading:\n" + "\n".join(f"  {line}" for line in report.lines), flush=True)
    if report.problems:
        raise InstantCharacterError("nothing was downloaded:\n" + "\n".join(f"  - {p}" for p in report.problems))


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
    from .files.encoder_files import load_reference_encoders
    from .files.flux import load_flux
    from .run.pipeline import generate
    from .run.settings import GenerationSettings, MemorySettings, RunHooks

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


def _selftest(args) -> int:
    from .run.quiet import libraries_quiet
    from .testing.tiny import write_tiny_models

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

    from .run.offload.planner import recommend_offload

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


def _add_storyboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("panels", type=Path, metavar="PANELS.txt",
                   help="one panel prompt per line (blank lines and lines starting with # are skipped)")
    p.add_argument("--style", default=None, help="added to every panel: 'TEXT' after each line, or 'TEXT {panel} "
                                              "TEXT' with the line in place of {panel}; default: none")
    p.add_argument("--candidates", type=int, default=4,
                   help="pictures drawn per panel; the one most like the character is kept")
    p.add_argument("--reference", type=Path, action="append",
                   help=f"reference picture of the character (repeat for several views); default: the bundled "
                        f"assets/{BUNDLED_REFERENCE.name}")
    p.add_argument("--character", type=Path, default=None,
                   help=f"a saved character file instead of --reference (a path, or a name in the models folder's "
                        f"{CHARACTERS_SUBDIR.as_posix()})")
    p.add_argument("--seed", type=int, default=123456,
                   help="the board's seed: every candidate's seed derives from it and the panel and candidate numbers")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the panels, contact_sheet.png and manifest.jsonl go (default output/<PANELS name>); "
                        "run again with the same folder to resume")
    p.add_argument("--width", type=int, default=1024, help="panel width in pixels, a multiple of 16")
    p.add_argument("--height", type=int, default=1024, help="panel height in pixels, a multiple of 16")
    p.add_argument("--steps", type=int, default=28, help="denoising steps per candidate")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev's distilled guidance")
    p.add_argument("--subject-scale", type=float, default=0.9, help="how strongly the character acts")
    p.add_argument("--fit", choices=("stretch", "pad", "crop"), default="stretch",
                   help="how a non-square --reference becomes square: stretch, pad with white, or crop the middle")
    p.add_argument("--offload", choices=("auto", "off", "budget", "sequential"), default="auto",
                   help="where the models stay during the run; auto picks from the free VRAM")
    p.add_argument("--vram-budget", type=float, default=None,
                   help="GiB (what nvidia-smi calls GB) the run may use with --offload budget; needed there")
    p.add_argument("--fp8", action="store_true",
                   help="store the transformer weights as fp8 (compute in bf16): half the memory to hold or stream")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight and compute dtype")
    p.add_argument("--download", action="store_true",
                   help="download the missing models first, after checking the disk space, the Hugging Face token "
                        "(FLUX.1-dev is gated) and the GPU")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help='draw the panels on a Ray cluster (pip install "ray>=2.50"): auto joins the cluster '
                        "RAY_ADDRESS or `ray start` names, else starts one here; or give the head's address")
    p.add_argument("--ray-actors", type=int, default=None,
                   help="Ray actors, each holding the models once (default: one per GPU of the cluster; without "
                        "GPUs one per machine)")


def _read_panels(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{path}: {'a folder' if path.is_dir() else 'not found'}; give a text file with one panel "
                         "prompt per line.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8.") from err


def cmd_storyboard(args) -> int:
    from .files.character_file import load_character
    from .files.encoder_files import load_reference_encoders
    from .files.storyboard_folder import BoardFolder
    from .reference.images import tensor_to_pil
    from .run.offload.placement import default_device
    from .run.settings import GenerationSettings, MemorySettings
    from .run.contact_sheet import contact_sheet
    from .run.storyboard import (Board, board_identity, check_prompt_lengths, encoders_on, panel_prompts,
                                 score_references)

    # everything the user typed is checked before any model is looked for, downloaded or loaded
    prompts = panel_prompts(_read_panels(args.panels), args.style or "")
    settings = GenerationSettings("", width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                                  subject_scale=args.subject_scale)
    memory = MemorySettings(args.offload, args.vram_budget, args.fp8)
    board = Board(prompts, args.candidates, args.seed, settings, memory)
    board.check()
    output = args.output_dir or Path("output") / args.panels.stem
    if output.exists() and not output.is_dir():
        raise InputError(f"--output-dir {output} is a file, not a folder: give a folder for the storyboard.")
    if args.ray is not None:
        from .run.storyboard_ray import require_ray

        require_ray()
    if args.character is not None:
        given = [character_file(args.models_dir or default_models_dir(), args.character)]
        features = load_character(given[0])
        score_references(features)  # it must keep its prepared pictures, for the score
    else:
        given = args.reference or [BUNDLED_REFERENCE]
        images = [_open_reference(p) for p in given]
        features = None  # encoded below, if a panel is left to draw
    paths = args.paths if hasattr(args, "paths") else _paths(args, ("flux", "siglip", "dinov2", "adapter"))
    from transformers import AutoTokenizer

    check_prompt_lengths(AutoTokenizer.from_pretrained(paths["flux"] / "tokenizer_2"), prompts,
                         settings.max_sequence_length)
    # the board's identity: what the user gave (file checksums), the settings and the models
    character_key = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in given]
    character_key.append("character file" if args.character is not None else f"fit {args.fit}")
    models_used = {name: Path(path).name for name, path in paths.items()} | {"dtype": args.dtype}
    folder = BoardFolder(output, board_identity(board, json.dumps(character_key), models_used), prompts)
    done = folder.open()
    for number, why in folder.dropped:
        print(f"panel {number}: drawing it again ({why})")
    todo = [n for n in range(1, board.panels + 1) if n not in done]
    if done:
        print(f"{len(done)} of {board.panels} panels already done in {output}; {len(todo)} to draw")
    dtype = _dtype(args.dtype)
    encoders = None
    if args.character is None and todo:
        encoders = load_reference_encoders(paths["siglip"], paths["dinov2"], dtype=dtype)
        with encoders_on(encoders, default_device()):
            features = encoders.encode(images, fit=args.fit).to("cpu")
        if args.ray is not None:
            encoders = None  # the actors load their own
    try:
        for result in _draw_panels(args, board, features, encoders, paths, dtype, todo):
            line = folder.add_panel(result.record(), tensor_to_pil(result.image))
            drawn_by = f" (drawn by {result.made_by})" if args.ray is not None else ""
            print(f"{result.summary()} → {output / line['file']}{drawn_by}", flush=True)
    except KeyboardInterrupt:
        print(f"\nstopped: {len(folder.done)} of {board.panels} panels done in {output}; run the same command again "
              "to draw the rest", file=sys.stderr)
        return 130
    folder.sort_manifest()
    sheet = folder.write_contact_sheet(contact_sheet(folder.panel_pictures(), prompts))
    print(f"wrote {board.panels} panels, {sheet} and {folder.manifest}")
    return 0


def _draw_panels(args, board, features, encoders, paths, dtype, todo):
    """The panels ``todo``, drawn here (models loaded once) or on Ray, in panel order."""
    if not todo:
        return
    if args.ray is not None:
        from .run.storyboard_ray import BoardJob, panels_on_ray

        def ready(actors):
            for i, where in enumerate(actors, 1):
                threads = where["threads"]
                cores = f", {threads} thread" + "s" * (threads != 1) if where["device"] == "cpu" else ""
                print(f"ray actor {i}: {where['host']} pid {where['pid']}, {where['device']}{cores}", flush=True)

        job = BoardJob({k: str(v) for k, v in paths.items()}, args.dtype, board, features)
        yield from panels_on_ray(job, todo, args.ray, args.ray_actors, on_ready=ready)
        return

    from .run.settings import RunHooks
    from .run.storyboard import BoardModels, render_panel, score_references
    from .files.adapter_file import load_adapter
    from .files.encoder_files import load_reference_encoders
    from .files.flux import load_flux

    started = time.perf_counter()
    if encoders is None:
        encoders = load_reference_encoders(paths["siglip"], paths["dinov2"], dtype=dtype)
    models = BoardModels(load_flux(paths["flux"], dtype=dtype), load_adapter(paths["adapter"], dtype=dtype), encoders)
    print(f"models loaded in {time.perf_counter() - started:.1f} s", flush=True)
    references = score_references(features)
    interactive = sys.stdout.isatty()
    for number in todo:
        def progress(done, total, _, number=number):
            if interactive:
                print(f"\rpanel {number}/{board.panels}: step {done}/{total}", end="", flush=True)

        panel = render_panel(models, board, features, number, hooks=RunHooks(on_step=progress), references=references)
        if interactive:
            print("\r", end="")
        yield panel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instantcharacter", description=__doc__,
                                     formatter_class=_HelpFormatter)
    models_help = "ComfyUI models folder (default: COMFYUI_MODELS_DIR, the ComfyUI this pack is in, or ./models)"
    parser.add_argument("--models-dir", type=Path, default=None, help=models_help)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate pictures of a character", formatter_class=_HelpFormatter,
                         description="Generate pictures of a character with FLUX.1-dev and InstantCharacter.")
    _add_generation_args(gen)
    gen.add_argument("--download", action="store_true",
                     help="download the missing models first, after checking the disk space, the Hugging Face token "
                          "(FLUX.1-dev is gated) and the GPU")
    doc = sub.add_parser("doctor", help="check the machine and the model files", formatter_class=_HelpFormatter,
                         description="Report torch, the GPU, the model files and the offload setting to use.")
    doc.add_argument("--selftest", action="store_true",
                     help="also run a tiny RANDOM end-to-end generation on the CPU (no real weights needed)")
    doc.add_argument("--verbose", action="store_true",
                     help="with --selftest, show the libraries' warnings and progress bars too")
    story = sub.add_parser("storyboard", help="one character through the panels of a text file, the best of k each",
                           formatter_class=_HelpFormatter,
                           description="Draw a character through every panel of a story (one prompt per line), the "
                                       "best of --candidates pictures each, into numbered files, a contact sheet "
                                       "and manifest.jsonl; run again to resume. --ray draws the panels on a Ray "
                                       "cluster.")
    _add_storyboard_args(story)
    for command in (gen, doc, story):  # accepted after the command too; SUPPRESS keeps a value given before it
        command.add_argument("--models-dir", type=Path, default=argparse.SUPPRESS, help=models_help)
    args = parser.parse_args(argv)
    drawing = args.command in ("generate", "storyboard")
    if drawing and args.character is not None and args.reference:
        parser.error("--character and --reference both give the character: use one")
    if drawing and args.offload == "budget" and args.vram_budget is None:
        parser.error("--offload budget needs --vram-budget GiB (the VRAM the run may use)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"generate": cmd_generate, "doctor": cmd_doctor, "storyboard": cmd_storyboard}
    try:
        return commands[args.command](args)
    except InstantCharacterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
