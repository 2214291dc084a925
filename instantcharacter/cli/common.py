"""What the commands share: the bundled reference picture, the dtype names, the help layout, finding (and with
``--download`` fetching) the models, and opening a reference picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError, InstantCharacterError
from ..files import hub
from ..files.locations import CHARACTERS_SUBDIR, default_models_dir, locate_all

ASSETS = Path(__file__).resolve().parents[2] / "assets"
BUNDLED_REFERENCE = ASSETS / "reference_girl.png"


def dtype_of(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_character_args(p: argparse.ArgumentParser, character_note: str = "") -> None:
    """--reference (pictures of the character) and --character (a saved one), as generate and storyboard take them."""
    p.add_argument("--reference", type=Path, action="append",
                   help=f"reference picture of the character (repeat for several views); default: the bundled "
                        f"assets/{BUNDLED_REFERENCE.name}")
    p.add_argument("--character", type=Path, default=None,
                   help=f"a saved character file instead of --reference (a path, or a name in the models folder's "
                        f"{CHARACTERS_SUBDIR.as_posix()}){character_note}")


def model_paths(args, needed: tuple[str, ...]) -> dict[str, Path]:
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
    from ..run.first_run import check_before_download, find_gpu

    report = check_before_download(missing, models_dir, find_gpu())
    print("before downloading:\n" + "\n".join(f"  {line}" for line in report.lines), flush=True)
    if report.problems:
        raise InstantCharacterError("nothing was downloaded:\n" + "\n".join(f"  - {p}" for p in report.problems))


def open_reference(path: Path):
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
