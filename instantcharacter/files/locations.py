"""Where the model files live in a ComfyUI models folder, for the command line (the nodes use
ComfyUI's own folder_paths)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .hub import ADAPTER, ADAPTER_FILENAME, DINOV2, FLUX_DEV, SIGLIP, HubModel, missing_encoder_files, missing_flux_files

# ComfyUI folder names and the folders they map to, in ComfyUI's order (downloads go to the first).
FOLDER_ALIASES = {"diffusion_models": ("unet", "diffusion_models"), "clip_vision": ("clip_vision",),
                  "ipadapter": ("ipadapter",)}
# saved characters: ComfyUI's folder "instantcharacter_characters" (extra_model_paths.yaml can add others)
CHARACTERS_FOLDER = "instantcharacter_characters"
CHARACTERS_SUBDIR = Path("instantcharacter") / "characters"


@dataclass
class ModelLocation:
    model: HubModel
    path: Path  # where it is, or where it goes
    present: bool
    detail: str

    @property
    def download_folder(self) -> Path:
        """The folder a download of this model writes into (the adapter is one file in its folder)."""
        from .hub import ADAPTER

        return self.path.parent if self.model is ADAPTER else self.path


def default_models_dir() -> Path:
    """``COMFYUI_MODELS_DIR``, else the models folder of the ComfyUI this pack sits in, else ./models."""
    env = os.environ.get("COMFYUI_MODELS_DIR")
    if env:
        return Path(env)
    pack = Path(__file__).resolve().parents[2]
    if pack.parent.name == "custom_nodes" and (pack.parents[1] / "models").is_dir():
        return pack.parents[1] / "models"
    return Path("models")


def _candidates(models_dir: Path, model: HubModel) -> list[Path]:
    folders = [models_dir / name for name in FOLDER_ALIASES[model.model_folder]]
    if model is ADAPTER:
        return [f / ADAPTER_FILENAME for f in folders]
    return [f / model.folder_name for f in folders]


def locate(models_dir: str | os.PathLike, model: HubModel) -> ModelLocation:
    models_dir = Path(models_dir)
    candidates = _candidates(models_dir, model)
    for path in candidates:
        if model is ADAPTER:
            if path.is_file() and path.stat().st_size > 0:
                return ModelLocation(model, path, True, "present")
            continue
        if path.is_dir():
            missing = missing_flux_files(path) if model is FLUX_DEV else missing_encoder_files(path)
            if not missing:
                return ModelLocation(model, path, True, "present")
            return ModelLocation(model, path, False, f"incomplete: missing {', '.join(missing[:3])}")
    return ModelLocation(model, candidates[0], False, "missing")


def locate_all(models_dir: str | os.PathLike) -> dict[str, ModelLocation]:
    return {"flux": locate(models_dir, FLUX_DEV), "siglip": locate(models_dir, SIGLIP),
            "dinov2": locate(models_dir, DINOV2), "adapter": locate(models_dir, ADAPTER)}


def character_file(models_dir: str | os.PathLike, name: str | os.PathLike) -> Path:
    """A character file given as a path, or by its name in the models folder's characters folder."""
    path = Path(name)
    inside = Path(models_dir) / CHARACTERS_SUBDIR / path
    return inside if not path.exists() and not path.is_absolute() and inside.exists() else path
