"""``storyboard``: one character through the panels of a text file, the best of k candidates each, into a folder
that resumes after a crash; here or on a Ray cluster."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..files.locations import character_file, default_models_dir
from .common import BUNDLED_REFERENCE, add_character_args, dtype_of, model_paths, open_reference


def add_storyboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("panels", type=Path, metavar="PANELS.txt",
                   help="one panel prompt per line (blank lines and lines starting with # are skipped)")
    p.add_argument("--style", default=None, help="added to every panel: 'TEXT' after each line, or 'TEXT {panel} "
                                              "TEXT' with the line in place of {panel}; default: none")
    p.add_argument("--candidates", type=int, default=4,
                   help="pictures drawn per panel; the one most like the character is kept")
    add_character_args(p)
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
    from ..files.character_file import load_character
    from ..files.encoder_files import load_reference_encoders
    from ..files.storyboard_folder import BoardFolder
    from ..reference.images import tensor_to_pil
    from ..run.offload.placement import default_device
    from ..run.settings import GenerationSettings, MemorySettings
    from ..run.contact_sheet import contact_sheet
    from ..run.storyboard import (Board, board_identity, check_prompt_lengths, encoders_on, panel_prompts,
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
        from ..run.storyboard_ray import require_ray

        require_ray()
    if args.character is not None:
        given = [character_file(args.models_dir or default_models_dir(), args.character)]
        features = load_character(given[0])
        score_references(features)  # it must keep its prepared pictures, for the score
    else:
        given = args.reference or [BUNDLED_REFERENCE]
        images = [open_reference(p) for p in given]
        features = None  # encoded below, if a panel is left to draw
    paths = args.paths if hasattr(args, "paths") else model_paths(args, ("flux", "siglip", "dinov2", "adapter"))
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
    dtype = dtype_of(args.dtype)
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
        from ..run.storyboard_ray import BoardJob, panels_on_ray

        def ready(actors):
            for i, where in enumerate(actors, 1):
                threads = where["threads"]
                cores = f", {threads} thread" + "s" * (threads != 1) if where["device"] == "cpu" else ""
                print(f"ray actor {i}: {where['host']} pid {where['pid']}, {where['device']}{cores}", flush=True)

        job = BoardJob({k: str(v) for k, v in paths.items()}, args.dtype, board, features)
        yield from panels_on_ray(job, todo, args.ray, args.ray_actors, on_ready=ready)
        return

    from ..run.settings import RunHooks
    from ..run.storyboard import BoardModels, render_panel, score_references
    from ..files.adapter_file import load_adapter
    from ..files.encoder_files import load_reference_encoders
    from ..files.flux import load_flux

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
