"""Model folders: registered by merging into ComfyUI's folder_paths, and listed for the loader combos."""

from __future__ import annotations

import json
import os

import folder_paths

IPADAPTER = "ipadapter"
DOWNLOAD_SUFFIX = " (download)"


def register() -> None:
    """Add models/ipadapter without dropping any path the user configured (extra_model_paths.yaml)."""
    folder_paths.add_model_folder_path(IPADAPTER, os.path.join(folder_paths.models_dir, IPADAPTER))
    paths, extensions = folder_paths.folder_names_and_paths[IPADAPTER]
    if not extensions:
        folder_paths.folder_names_and_paths[IPADAPTER] = (paths, set(folder_paths.supported_pt_extensions))


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
