"""Loading the two reference encoders: SigLIP so400m-384 from a Hugging Face folder or a single file (FLUX
Redux's ``sigclip_vision_patch14_384.safetensors``), DINOv2-giant from its folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import ModelFolderError
from ..reference.encoders import DINO_DEFAULT_NORM, DINO_LAYERS, SIGLIP_DEFAULT_NORM, SIGLIP_LAYERS, ReferenceEncoders
from .checkpoint import CheckpointReadError, check_declared_sizes, short_error
from .single_file import load_siglip_vision

SIGLIP_TYPES = ("siglip", "siglip_vision_model")
SIGLIP_NAME = "google/siglip-so400m-patch14-384"
DINO_NAME = "facebook/dinov2-giant"


def _model_type(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelFolderError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelFolderError(f"{config} is not valid JSON ({err}): the download is damaged; download the "
                               "folder again.") from err
    return data.get("model_type", "") if isinstance(data, dict) else ""


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def normalisation(folder: Path, default) -> tuple[torch.Tensor, torch.Tensor]:
    path = folder / "preprocessor_config.json"
    mean, std = default
    if path.is_file():
        data = json.loads(path.read_text())
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def check_folder(folder: Path, role: str, expected_types: tuple[str, ...], described: str) -> None:
    if not folder.is_dir():
        raise ModelFolderError(f"The {role} folder {folder} does not exist. Expected {described}.")
    kind = _model_type(folder)
    if kind not in expected_types:
        raise ModelFolderError(
            f"{folder.name} holds a '{kind or 'unknown'}' model, but the {role} slot needs {described}."
        )
    if not _has_weights(folder):
        raise ModelFolderError(f"{folder} has no weights (*.safetensors): the download is incomplete.")
    if not any(folder.glob("*.safetensors")):  # transformers will unpickle the .bin weights: bound them first
        for pickled in sorted(folder.glob("*.bin")):
            try:
                check_declared_sizes(pickled)
            except CheckpointReadError as err:
                raise ModelFolderError(f"The {role} folder {folder} is not loaded: {pickled.name} {err.reason}. "
                                       "Download the folder again (its .safetensors weights).") from err


@contextlib.contextmanager
def _quiet_load_report():
    """transformers logs a table of every unused key (SigLIP's text tower: hundreds of lines in ComfyUI's console);
    missing keys, the ones that matter, are checked by :func:`_from_pretrained` instead."""
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils", "transformers.utils.loading_report")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _from_pretrained(cls, folder: Path, dtype: torch.dtype, role: str):
    with _quiet_load_report():
        try:
            model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        except Exception as err:  # noqa: BLE001 - JSON, shard, pickle and OS errors all mean a damaged folder
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                raise ModelFolderError(
                    f"The {role} folder {folder} holds pickled weights with Python objects other than tensors, "
                    "which are not loaded (they could run code). Use the model's .safetensors weights: download "
                    "the folder again.") from err
            raise ModelFolderError(
                f"The {role} folder {folder} could not be loaded ({type(err).__name__}: {short_error(err)}). Its "
                "files are incomplete, damaged or not safe to open: download it again.") from err
    missing = info.get("missing_keys") or []
    if missing:
        raise ModelFolderError(f"The {role} folder {folder} lacks {len(missing)} weight(s) its config needs (e.g. "
                               f"{', '.join(sorted(missing)[:3])}): it is incomplete or holds another model. "
                               "Download it again.")
    return model


def load_reference_encoders(siglip: str | os.PathLike, dino: str | os.PathLike, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> ReferenceEncoders:
    """SigLIP from a Hugging Face folder or a single file, DINOv2 from its folder; both checked to be the
    models InstantCharacter reads (layer counts), with the input normalisation their folders give."""
    from transformers import Dinov2Model, SiglipVisionModel

    siglip, dino = Path(siglip), Path(dino)
    if siglip.is_dir():
        check_folder(siglip, "SigLIP", SIGLIP_TYPES, SIGLIP_NAME)
    check_folder(dino, "DINOv2", ("dinov2",), DINO_NAME)
    if siglip.is_dir():
        siglip_model = _from_pretrained(SiglipVisionModel, siglip, dtype, "SigLIP").to(device).eval()
        siglip_norm = normalisation(siglip, SIGLIP_DEFAULT_NORM)
    else:
        siglip_model = load_siglip_vision(siglip, dtype).to(device)
        mean, std = SIGLIP_DEFAULT_NORM
        siglip_norm = (torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    dino_model = _from_pretrained(Dinov2Model, dino, dtype, "DINOv2").to(device).eval()
    if not siglip.is_dir() and dino_model.config.num_hidden_layers != DINO_LAYERS:
        raise ModelFolderError(f"{dino.name} has {dino_model.config.num_hidden_layers} layers; InstantCharacter "
                               f"needs DINOv2-giant ({DINO_LAYERS}).")
    got = (siglip_model.config.num_hidden_layers, dino_model.config.num_hidden_layers)
    if got != (SIGLIP_LAYERS, DINO_LAYERS):
        raise ModelFolderError(
            f"The encoders have {got[0]} (SigLIP) and {got[1]} (DINOv2) layers; InstantCharacter needs "
            f"SigLIP so400m-patch14-384 ({SIGLIP_LAYERS}) and DINOv2-giant ({DINO_LAYERS})."
        )
    return ReferenceEncoders(siglip_model, dino_model, siglip_norm, normalisation(dino, DINO_DEFAULT_NORM),
                             names=(siglip.name, dino.name))
