"""SigLIP so400m-384 and DINOv2-giant turn reference pictures into the features the adapter reads
(loading them: :mod:`..files.encoders`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..cancel import cancel_points
from ..errors import InputError
from .images import LOW_RES, prepare_reference, reference_views

SIGLIP_SHALLOW_LAYERS = (7, 13, 26)
DINO_SHALLOW_LAYERS = (9, 19, 29)
SIGLIP_LAYERS = 27
DINO_LAYERS = 40
SIGLIP_DEFAULT_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DINO_DEFAULT_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


PREVIEW_SIDE = 128  # the prepared pictures a character keeps, small, for a character file's preview
PREVIEW_LIMIT = 8
# The largest feature value a character may hold. SigLIP so400m's and DINOv2-giant's hidden states stay within a
# few hundred, their rare "massive activations" within a few thousand; a feature past this bound was not made by
# them (an altered or damaged file) and would overflow the projector into NaN (black) pictures.
FEATURE_LIMIT = 1e5


@dataclass(frozen=True)
class EncoderIdentity:
    """The encoders that made a character's features: their names (the folder or file each was loaded from)
    and their widths. The adapter only sees the sum; the two widths tell encoders of equal sum apart."""

    siglip: str
    siglip_width: int
    dinov2: str
    dinov2_width: int

    @property
    def feature_dim(self) -> int:
        return self.siglip_width + self.dinov2_width

    def describe(self) -> str:
        return (f"SigLIP '{self.siglip}' (width {self.siglip_width}) and DINOv2 '{self.dinov2}' "
                f"(width {self.dinov2_width})")


@dataclass(frozen=True)
class FeatureSource:
    """How a character's features were made, kept with them so that a character file can say it."""

    encoders: EncoderIdentity
    settings: dict  # how the pictures were prepared and fused (fit, crop_to_character, margin, weights, …): JSON
    preview: torch.Tensor | None = None  # uint8 [N, PREVIEW_SIDE, PREVIEW_SIDE, 3]: the prepared pictures


@dataclass
class ReferenceFeatures:
    """Encoder features of one character, SigLIP channels first, then DINOv2 channels.

    low_res_shallow [1, 3·729, C], low_res_deep [1, 729, C], high_res_deep [1, 4·729, C]: the order of
    the projector's arguments. ``source``: how they were made (None when the code that made them did not say).
    """

    low_res_shallow: torch.Tensor
    low_res_deep: torch.Tensor
    high_res_deep: torch.Tensor
    source: FeatureSource | None = None

    def to(self, *args, **kwargs) -> "ReferenceFeatures":
        moved = (t.to(*args, **kwargs) for t in self.tensors())
        return dataclasses.replace(self, **dict(zip(("low_res_shallow", "low_res_deep", "high_res_deep"), moved)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.low_res_shallow, self.low_res_deep, self.high_res_deep

    @property
    def feature_dim(self) -> int:
        return self.low_res_deep.shape[-1]

    def largest_value(self) -> float:
        """The largest magnitude among the features (NaN if any is NaN)."""
        peaks = torch.stack([t.detach().abs().max().float().cpu() for t in self.tensors()])
        return float(peaks.max()) if not peaks.isnan().any() else float("nan")

    def check_fits(self, feature_dim: int) -> None:
        """Refuse, by name, features an adapter whose projector reads ``feature_dim`` channels cannot read."""
        if self.feature_dim == feature_dim:
            return
        made = f", made by {self.source.encoders.describe()}" if self.source is not None else ""
        raise InputError(
            f"This character's features are {self.feature_dim} channels wide{made}; the adapter reads {feature_dim} "
            "(the published one: SigLIP so400m-patch14-384, width 1152, and DINOv2-giant, width 1536). Encode the "
            "reference again with the encoders this adapter belongs to.")

    @staticmethod
    def blend(items: list["ReferenceFeatures"], weights: list[float] | None = None) -> "ReferenceFeatures":
        """Weighted mean of several characters' (or views') features; weights are normalised to sum 1."""
        if not items:
            raise InputError("No reference features to combine.")
        w = torch.tensor(weights if weights is not None else [1.0] * len(items), dtype=torch.float64)
        if w.numel() != len(items) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise InputError(f"Need one non-negative weight per reference with a positive sum, got {weights}.")
        _check_same_encoders(items)
        w = (w / w.sum()).tolist()
        fields = zip(*(f.tensors() for f in items))
        mean = (sum(wi * t.float() for wi, t in zip(w, ts)).to(ts[0].dtype) for ts in fields)
        return ReferenceFeatures(*mean, source=_blended_source(items, w))


def _check_same_encoders(items: list[ReferenceFeatures]) -> None:
    totals = {f.feature_dim for f in items}
    splits = {(f.source.encoders.siglip_width, f.source.encoders.dinov2_width) for f in items if f.source}
    if len(totals) > 1 or len(splits) > 1:
        made = "; ".join(f.source.encoders.describe() if f.source else f"{f.feature_dim} channels" for f in items)
        raise InputError(f"These characters were made by different encoders ({made}): only characters encoded "
                         "with the same SigLIP and DINOv2 can be blended.")


def _blended_source(items: list[ReferenceFeatures], weights: list[float]) -> FeatureSource | None:
    sources = [f.source for f in items]
    if any(s is None for s in sources):
        return None
    if len(sources) == 1:
        return sources[0]

    def names(attr: str) -> str:
        return " + ".join(dict.fromkeys(getattr(s.encoders, attr) for s in sources))

    first = sources[0].encoders
    encoders = EncoderIdentity(names("siglip"), first.siglip_width, names("dinov2"), first.dinov2_width)
    share = -(-PREVIEW_LIMIT // len(sources))  # each character keeps a fair share of the thumbnails
    previews = [s.preview[:share] for s in sources if s.preview is not None]
    preview = torch.cat(previews)[:PREVIEW_LIMIT] if previews else None
    return FeatureSource(encoders, {"blend": [s.settings for s in sources], "blend_weights": weights}, preview)


def preview_of(squares: list[Image.Image]) -> torch.Tensor:
    """Small thumbnails of the prepared squares (the first PREVIEW_LIMIT), uint8 [N, side, side, 3]."""
    side = (PREVIEW_SIDE, PREVIEW_SIDE)
    small = [np.asarray(sq.convert("RGB").resize(side, Image.BICUBIC), dtype=np.uint8) for sq in squares[:PREVIEW_LIMIT]]
    return torch.from_numpy(np.stack(small))


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


def preparation(fit: str, crop: bool, margin: float) -> dict:
    """How pictures became the encoders' squares, as a character's source records it."""
    return {"fit": fit, "crop_to_character": bool(crop), "margin": float(margin)}


def parse_weights(text: str, count: int) -> list[float] | None:
    """'1, 1, 0.5' → [1.0, 1.0, 0.5] (one weight per picture); empty → None (all equal)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        weights = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError as err:
        raise InputError(f"weights must be numbers separated by commas, e.g. '1, 1, 0.5'; got {text!r}") from err
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise InputError(f"weights must be finite numbers of 0 or more (e.g. '1, 1, 0.5'); got {bad[0]!r} in {text!r}.")
    if len(weights) != count:
        raise InputError(f"weights lists {len(weights)} numbers but {count} pictures were given; give one per picture.")
    return weights


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
