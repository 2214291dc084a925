"""Model folders: registered by merging into ComfyUI's folder_paths, listed for the loader combos, and the
user's pick turned into a path (or a download)."""

from __future__ import annotations

import inspect
import json
import os

import folder_paths

from ..instantcharacter.files import hub
from ..instantcharacter.files.locations import CHARACTERS_FOLDER, CHARACTERS_SUBDIR

IPADAPTER = "ipadapter"
DOWNLOAD_SUFFIX = " (download)"


def register() -> None:
    """Add models/ipadapter and models/instantcharacter/characters without dropping any path the user
    configured (extra_model_paths.yaml)."""
    _add(IPADAPTER, IPADAPTER, set(folder_paths.supported_pt_extensions))
    _add(CHARACTERS_FOLDER, str(CHARACTERS_SUBDIR), {".safetensors"})


def _add(folder_name: str, subdir: str, extensions: set[str]) -> None:
    folder_paths.add_model_folder_path(folder_name, os.path.join(folder_paths.models_dir, subdir))
    paths, known = folder_paths.folder_names_and_paths[folder_name]
    if not known:
        folder_paths.folder_names_and_paths[folder_name] = (paths, extensions)


def subfolders(folder_name: str, model_types: tuple[str, ...] | None = None) -> dict[str, str]:
    """Sub-folders of a model folder holding a diffusers/transformers model: display name → path.

    ``model_types`` None: diffusers pipelines (model_index.json); otherwise config.json model_type values.
    """
    found: dict[str, str] = {}
    for root in folder_paths.get_folder_paths(folder_name):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if not os.path.isdir(path) or name in found:
                continue
            if model_types is None:
                if os.path.isfile(os.path.join(path, "model_index.json")):
                    found[name] = path
                continue
            config = os.path.join(path, "config.json")
            try:
                with open(config, encoding="utf-8") as f:
                    kind = json.load(f).get("model_type")
            except (OSError, ValueError):
                continue
            if kind in model_types:
                found[name] = path
    return found


def download_target(folder_name: str) -> str:
    """The first configured path of a model folder (models/unet for diffusion_models), created if needed."""
    path = folder_paths.get_folder_paths(folder_name)[0]
    os.makedirs(path, exist_ok=True)
    return path


class ChoiceGoneError(FileNotFoundError):
    """A file or folder picked in a node is no longer on disk (the node's list is from before)."""

    def __init__(self, name: str, folder_name: str, alternative: str | None = None):
        other = f", or choose '{alternative}'" if alternative else ""
        super().__init__(f"{name} is no longer in the {folder_name} folder; refresh the node (press R) and pick "
                         f"another{other}.")


def file_choice(folder_name: str, name: str, alternative: str | None = None) -> str:
    """The full path of a file picked from a model folder's list."""
    path = folder_paths.get_full_path(folder_name, name)
    if path is None:
        raise ChoiceGoneError(name, folder_name, alternative)
    return path


def folder_choice(choice: str, options: dict[str, str], model: hub.HubModel, folder_name: str) -> str:
    """The path of a picked model folder, downloading it first when the pick is the "(download)" entry."""
    if choice.endswith(DOWNLOAD_SUFFIX):
        return download(model, os.path.join(download_target(folder_name), model.folder_name))
    if choice not in options:
        raise ChoiceGoneError(choice, folder_name, f"{model.folder_name}{DOWNLOAD_SUFFIX}")
    return options[choice]


def download(model: hub.HubModel, dest: str) -> str:
    """Download with ComfyUI's progress bar (one step per file pattern)."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(len(model.patterns))
    return str(hub.download(model, dest, progress=lambda done, total: bar.update_absolute(done, total)))


def model_files(folder_name: str) -> list[str]:
    """Single model files in a ComfyUI model folder, without the files inside diffusers/transformers model
    folders (those are offered as folders)."""
    roots = [r for r in folder_paths.get_folder_paths(folder_name) if os.path.isdir(r)]
    seen: dict[str, bool] = {}

    def is_model_folder(rel: str) -> bool:
        if rel not in seen:
            seen[rel] = any(os.path.isfile(os.path.join(root, rel, marker))
                            for root in roots for marker in ("config.json", "model_index.json"))
        return seen[rel]

    def inside_model_folder(name: str) -> bool:
        parent = os.path.dirname(name)
        while parent:
            if is_model_folder(parent):
                return True
            parent = os.path.dirname(parent)
        return False

    return [f for f in folder_paths.get_filename_list(folder_name) if not inside_model_folder(f)]


def likely(options: list[str], *hints: str) -> str | None:
    """The first option whose file name starts with one of ``hints`` (in order), to preselect the usual file."""
    for hint in hints:
        for option in options:
            if os.path.basename(option).lower().startswith(hint):
                return option
    return None


def comfy_tokenizer_dirs() -> tuple[str, str]:
    """The CLIP and T5 tokenizer folders that ship with the running ComfyUI: beside the modules whose FLUX
    text encoders read them."""
    import comfy.sd1_clip
    import comfy.text_encoders.flux

    clip_dir = os.path.dirname(os.path.realpath(inspect.getfile(comfy.sd1_clip)))
    t5_dir = os.path.dirname(os.path.realpath(inspect.getfile(comfy.text_encoders.flux)))
    return os.path.join(clip_dir, "sd1_tokenizer"), os.path.join(t5_dir, "t5_tokenizer")
