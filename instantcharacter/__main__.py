"""Command line: ``python -m instantcharacter generate|doctor|storyboard``.

``generate`` runs the same code as the ComfyUI nodes without ComfyUI; ``doctor`` reports the machine,
the model files and the offload setting to use (``--selftest`` runs a tiny random end-to-end);
``storyboard`` draws one character through the panels of a text file, the best of k candidates each, resumable,
here or on a Ray cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli.common import HelpFormatter
from .cli.doctor import cmd_doctor
from .cli.generate import add_generation_args, cmd_generate
from .cli.storyboard import add_storyboard_args, cmd_storyboard
from .errors import InstantCharacterError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instantcharacter", description=__doc__.replace("``", ""),
                                     formatter_class=HelpFormatter)
    models_help = "ComfyUI models folder (default: COMFYUI_MODELS_DIR, the ComfyUI this pack is in, or ./models)"
    parser.add_argument("--models-dir", type=Path, default=None, help=models_help)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate pictures of a character", formatter_class=HelpFormatter,
                         description="Generate pictures of a character with FLUX.1-dev and InstantCharacter.")
    add_generation_args(gen)
    gen.add_argument("--download", action="store_true",
                     help="download the missing models first, after checking the disk space, the Hugging Face token "
                          "(FLUX.1-dev is gated) and the GPU")
    doc = sub.add_parser("doctor", help="check the machine and the model files", formatter_class=HelpFormatter,
                         description="Report torch, the GPU, the model files and the offload setting to use.")
    doc.add_argument("--selftest", action="store_true",
                     help="also run a tiny RANDOM end-to-end generation on the CPU (no real weights needed)")
    doc.add_argument("--verbose", action="store_true",
                     help="with --selftest, show the libraries' warnings and progress bars too")
    story = sub.add_parser("storyboard", help="one character through the panels of a text file, the best of k each",
                           formatter_class=HelpFormatter,
                           description="Draw a character through every panel of a story (one prompt per line), the "
                                       "best of --candidates pictures each, into numbered files, a contact sheet "
                                       "and manifest.jsonl; run again to resume. --ray draws the panels on a Ray "
                                       "cluster.")
    add_storyboard_args(story)
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
