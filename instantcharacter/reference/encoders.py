"""SigLIP so400m-384 and DINOv2-giant turn reference pictures into the features the adapter reads (what those
features carry: :mod:`.character`; loading the encoders: :mod:`..files.encoder_files`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..cancel import cancel_points
from ..errors import InputError
from .character import EncoderIdentity, FeatureSource, ReferenceFeatures, preparation, preview_of
from .images import LOW_RES, prepare_reference, reference_views

SIGLIP_SHALLOW_LAYERS = (7, 13, 26)
DINO_SHALLOW_LAYERS = (9, 19, 29)
SIGLIP_LAYERS = 27
DINO_LAYERS = 40
SIGLIP_DEFAULT_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DINO_DEFAULT_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _blocks(model, *paths: str) -> list:
    """The transformer layers of an encoder (for cancel points) at the first of ``paths`` it has, or the whole model
    if it is built otherwise."""
    for path in paths:
        found = model
        for name in path.split("."):
            found = getattr(found, name, None)
        if found is not None:
            return list(found)
    return [model]


def _config_name(model) -> str:
    path = getattr(model.config, "_name_or_path", "") or ""
    return Path(path).name or model.config.model_type


class ReferenceEncoders:
    """The two vision encoders and their input normalisation."""

    def __init__(self, siglip, dino, siglip_norm, dino_norm, names: tuple[str, str] | None = None):
        """``names``: what the two were loaded from (folder or file names), for the features' identity."""
        self.siglip = siglip
        self.dino = dino
        self.siglip_norm = siglip_norm
        self.dino_norm = dino_norm
        self.names = names or (_config_name(siglip), _config_name(dino))

    @property
    def feature_dim(self) -> int:
        return self.identity.feature_dim

    @property
    def identity(self) -> EncoderIdentity:
        return EncoderIdentity(self.names[0], self.siglip.config.hidden_size, self.names[1],
                               self.dino.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.siglip.parameters()).device

    def to(self, device) -> "ReferenceEncoders":
        self.siglip.to(device)
        self.dino.to(device)
        return self

    def _pixels(self, views: list[Image.Image], norm) -> torch.Tensor:
        array = np.stack([np.asarray(v, dtype=np.float32) for v in views]) / 255.0
        pixels = torch.from_numpy(array).permute(0, 3, 1, 2)
        mean, std = norm
        return (pixels - mean) / std

    @torch.inference_mode()
    def _encode(self, model, views, norm, shallow_layers, drop_cls: bool):
        param = next(model.parameters())
        pixels = self._pixels(views, norm).to(param.device, param.dtype)
        out = model(pixel_values=pixels, output_hidden_states=True)
        start = 1 if drop_cls else 0
        deep = out.last_hidden_state[:, start:]
        shallow = torch.cat([out.hidden_states[i][:, start:] for i in shallow_layers], dim=1)
        return deep, shallow

    def encode_square(self, square: Image.Image) -> ReferenceFeatures:
        """Features of one square RGB reference (see :func:`images.reference_views`)."""
        views = reference_views(square)
        s_deep, s_shallow = self._encode(self.siglip, views, self.siglip_norm, SIGLIP_SHALLOW_LAYERS, False)
        d_deep, d_shallow = self._encode(self.dino, views, self.dino_norm, DINO_SHALLOW_LAYERS, True)
        low_deep = torch.cat([s_deep[:1], d_deep[:1]], dim=2)
        low_shallow = torch.cat([s_shallow[:1], d_shallow[:1]], dim=2)
        # the four tiles' tokens laid end to end
        high_deep = torch.cat([s_deep[1:].flatten(0, 1), d_deep[1:].flatten(0, 1)], dim=1)[None]
        return ReferenceFeatures(low_res_shallow=low_shallow, low_res_deep=low_deep, high_res_deep=high_deep)

    def encode(self, images: list[Image.Image], fit: str = "stretch", weights: list[float] | None = None,
               masks: list | None = None, crop: bool = False, margin: float = 0.1) -> ReferenceFeatures:
        """Features of one character from one or more pictures of it.

        Several pictures are fused by a (weighted) mean of their encoder features, so views from different
        angles combine into one character. Images may be any PIL mode; transparency becomes white. See
        :func:`images.prepare_reference` for ``masks``, ``crop`` and ``margin``.
        """
        if not images:
            raise InputError("No reference image was given.")
        masks = masks or [None] * len(images)
        squares = [prepare_reference(im, fit, m, crop, margin) for im, m in zip(images, masks)]
        return self.encode_squares(squares, weights, preparation=preparation(fit, crop, margin))

    def encode_squares(self, squares: list[Image.Image], weights: list[float] | None = None,
                       cancel_check: Callable[[], None] | None = None,
                       preparation: dict | None = None) -> ReferenceFeatures:
        """``cancel_check()`` runs before every encoder layer (it stops the encoding by raising).
        ``preparation``: how the squares were made (:func:`preparation`), recorded in the features' source."""
        # transformers 5 builds SiglipVisionModel without its vision_model wrapper
        layers = [*_blocks(self.siglip, "vision_model.encoder.layers", "encoder.layers"),
                  *_blocks(self.dino, "encoder.layer")]
        with cancel_points(layers, cancel_check):
            features = ReferenceFeatures.blend([self.encode_square(sq) for sq in squares], weights)
        settings = {**(preparation or {}), "pictures": len(squares),
                    "weights": list(weights) if weights is not None else [1.0] * len(squares)}
        features.source = FeatureSource(self.identity, settings, preview_of(squares))
        return features

    @torch.inference_mode()
    def embed(self, squares: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-picture embeddings for comparing pictures: SigLIP's pooled output and DINOv2's CLS token,
        from the same 384² low-res view the adapter reads. Returns ([N, siglip width], [N, dino width])."""
        views = [sq.resize((LOW_RES, LOW_RES)) for sq in squares]
        param = next(self.siglip.parameters())
        s = self.siglip(pixel_values=self._pixels(views, self.siglip_norm).to(param.device, param.dtype))
        siglip = s.pooler_output if s.pooler_output is not None else s.last_hidden_state.mean(1)
        param = next(self.dino.parameters())
        d = self.dino(pixel_values=self._pixels(views, self.dino_norm).to(param.device, param.dtype))
        return siglip.float().cpu(), d.last_hidden_state[:, 0].float().cpu()
