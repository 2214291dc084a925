"""What a CHARACTER socket carries, in one place: a character's encoder features with the identity of the encoders
that made them and how the pictures were prepared and weighted (its provenance and small previews), characters
blended from several, a character confined to a region of the picture, several characters combined, and taking
any of them apart again (:func:`characters_in`, :func:`plain_features`).

A character as the samplers take it is either the encoder features alone (:class:`ReferenceFeatures`, acting
on the whole picture), a :class:`RegionalCharacter` (features, a region and a strength), or several of them
combined (:class:`Characters`). Both paths read them through :func:`characters_in`. (The encoders that make the
features: :mod:`.encoders`; a region's mask on the token grid: :mod:`..run.regions`.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

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



@dataclass(frozen=True)
class RegionalCharacter:
    """One character confined to a region of the generated picture (``mask`` None: everywhere); ``strength``
    multiplies the sampler's subject scale (or Apply's weight) for this character."""

    features: ReferenceFeatures
    mask: torch.Tensor | None = None
    strength: float = 1.0

    def __post_init__(self):
        try:
            finite = math.isfinite(self.strength)
        except TypeError:
            finite = False
        if not finite:  # ComfyUI's min/max check lets NaN through, and the API has none
            raise InputError(f"A character region's strength must be a finite number (1 = as set on the sampler or "
                             f"Apply), got {self.strength!r}.")

    def members(self) -> tuple["RegionalCharacter", ...]:
        return (self,)


@dataclass(frozen=True)
class Characters:
    """Several characters for one picture, each with its own region (or everywhere)."""

    items: tuple[RegionalCharacter, ...]

    def members(self) -> tuple[RegionalCharacter, ...]:
        return self.items


def characters_in(character) -> tuple[RegionalCharacter, ...]:
    """The characters a CHARACTER input holds: plain features are one character acting everywhere.

    Read by what the objects offer rather than by class, so a character made by another copy of this package
    (ComfyUI and tests can import the pack twice) is read the same."""
    members = getattr(character, "members", None)
    if callable(members):
        return tuple(members())
    if callable(getattr(character, "tensors", None)):
        return (RegionalCharacter(character),)
    raise InputError(f"Expected a character (from Encode Reference, Character Region or Combine Characters), got "
                     f"{type(character).__name__}.")


def plain_features(character, node: str) -> ReferenceFeatures:
    """The encoder features of a character with no region; a regional or combined one is refused by name."""
    members = getattr(character, "members", None)
    if not callable(members):
        return character
    kind = "combined characters (from Combine Characters)" if len(members()) != 1 else \
        "a character with a region (from Character Region)"
    raise InputError(f"{node} works on characters without a region, straight from Encode Reference; this one is "
                     f"{kind}. Use {node} before Character Region and Combine Characters.")
