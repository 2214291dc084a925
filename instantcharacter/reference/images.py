"""Reference picture preparation: colour mode, mask, fit to a square, and the views the encoders see."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

FitMode = Literal["stretch", "pad", "crop"]
FIT_MODES: tuple[str, ...] = ("stretch", "pad", "crop")
LOW_RES = 384
HIGH_RES = 768
WHITE = (255, 255, 255)


# Pictures larger than this on their longer side are shrunk (aspect kept) before being made square: the
# encoders never see more than 768², and a 30000×16 picture would otherwise become a 30000² canvas (3.9 GB).
MAX_SIDE = 4096


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float greyscale (I;16, I, F) as 8-bit greyscale: convert("RGB") would clip
    them to white or black. Integer pictures are read on the range their values fit (8 or 16 bits, else their
    maximum); float ones as 0–1 when they fit it, else 0–255 or their maximum."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"The picture ({image.mode}, {image.width}×{image.height}) holds NaN or infinite values.")
    top = float(values.max(initial=0.0))
    if image.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0 if top <= 255 else 255.0 / top
    else:
        scale = 1.0 if top <= 255 else 255.0 / 65535 if top <= 65535 else 255.0 / top
    return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image; transparency is composited onto white (the official references are on white)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def apply_mask(image: Image.Image, mask: np.ndarray | torch.Tensor) -> Image.Image:
    """Keep the character where ``mask`` is 1 and paint the rest white (soft masks blend)."""
    mask = torch.as_tensor(mask, dtype=torch.float32).squeeze()
    if mask.ndim != 2:
        raise InputError(f"A mask must be one 2-D map per image, got shape {tuple(mask.shape)}.")
    image = to_rgb(image)
    if tuple(mask.shape) != (image.height, image.width):
        raise InputError(
            f"The mask is {mask.shape[1]}×{mask.shape[0]} but the image is {image.width}×{image.height}; "
            "use a mask made from the same picture."
        )
    alpha = Image.fromarray((mask.clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L")
    background = Image.new("RGB", image.size, WHITE)
    return Image.composite(image, background, alpha)


def fit_square(image: Image.Image, fit: str = "stretch") -> Image.Image:
    """Make a square picture: ``stretch`` (the official behaviour: resize to the longer side, aspect lost),
    ``pad`` (centre on a white square, aspect kept) or ``crop`` (centre square, edges lost). Pictures longer
    than :data:`MAX_SIDE` are shrunk to it first."""
    image = to_rgb(image)
    w, h = image.size
    if max(w, h) > MAX_SIDE:
        shrink = MAX_SIDE / max(w, h)
        image = image.resize((max(1, round(w * shrink)), max(1, round(h * shrink))), Image.LANCZOS)
        w, h = image.size
    if fit == "stretch":
        side = max(w, h)
        return image.resize((side, side))
    if fit == "pad":
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), WHITE)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas
    if fit == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side))
    raise InputError(f"Unknown fit mode {fit!r}; choose one of {', '.join(FIT_MODES)}.")


def character_box(image: Image.Image, mask: np.ndarray | torch.Tensor | None = None,
                  white_threshold: int = 245) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of the character: where ``mask`` > 0.5, else where the alpha
    channel is not transparent, else where the picture is not (near) white. None if nothing is found."""
    if mask is not None:
        inside = torch.as_tensor(mask, dtype=torch.float32).squeeze().numpy() > 0.5
    elif image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        inside = np.asarray(image.convert("RGBA"))[..., 3] > 0
    else:
        inside = (np.asarray(image.convert("RGB")) < white_threshold).any(-1)
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def prepare_reference(image: Image.Image, fit: str = "stretch", mask=None, crop: bool = False,
                      margin: float = 0.1) -> Image.Image:
    """The square picture the encoders see: background made white (from ``mask``, 1 = character, or the
    alpha channel), optionally cropped to the character's bounding box plus ``margin`` × its longer side,
    then fitted to a square."""
    if mask is not None and float(torch.as_tensor(mask, dtype=torch.float32).max()) <= 0:
        raise InputError("The mask is empty (all 0): nothing of the picture would be kept. White (1) marks the "
                         "character; a mask from Load Image is 1 on the transparent background, so put an InvertMask "
                         "in between.")
    box = character_box(image, mask) if crop else None
    picture = apply_mask(image, mask) if mask is not None else to_rgb(image)
    if int(np.asarray(picture).min()) == 255:
        raise InputError(f"The reference ({image.width}×{image.height}) is entirely white once its transparent "
                         "parts are made white: there is no character to read. Check the picture and its mask.")
    if box is not None:
        left, top, right, bottom = box
        pad = int(round(margin * max(right - left, bottom - top)))
        box = (max(0, left - pad), max(0, top - pad), min(picture.width, right + pad),
               min(picture.height, bottom + pad))
        picture = picture.crop(box)
    return fit_square(picture, fit)


def reference_views(square: Image.Image) -> list[Image.Image]:
    """The five 384×384 views of a square reference: the low-res whole, then the 768² picture's four tiles
    in the order top-left, top-right, bottom-left, bottom-right."""
    low = square.resize((LOW_RES, LOW_RES))
    high = square.resize((HIGH_RES, HIGH_RES))
    tiles = [high.crop((x, y, x + LOW_RES, y + LOW_RES)) for y in (0, LOW_RES) for x in (0, LOW_RES)]
    return [low] + tiles


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI-style image [H, W, C] with values 0–1 (C = 1, 3 or 4) to PIL."""
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise InputError(f"Expected an image of shape [height, width, 1|3|4], got {tuple(image.shape)}.")
    values = image.detach().float().cpu()
    if not torch.isfinite(values).all():
        raise InputError("The IMAGE holds NaN or infinite values (a node before this one produced them).")
    array = (values.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return Image.fromarray(array[..., 0], mode="L")
    return Image.fromarray(array, mode="RGBA" if array.shape[-1] == 4 else "RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL to a ComfyUI-style [H, W, 3] float tensor in 0–1."""
    return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32) / 255.0)


def split_batch(images: torch.Tensor, mask: torch.Tensor | None = None) -> list[tuple[Image.Image, torch.Tensor | None]]:
    """A ComfyUI IMAGE batch [B, H, W, C] (+ optional MASK [B or 1, H, W], 1 = character) → (picture, mask)
    pairs, one mask shared by all pictures when only one is given."""
    if images.ndim == 3:
        images = images[None]
    pictures = [tensor_to_pil(im) for im in images]
    if mask is None:
        return [(p, None) for p in pictures]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[0] not in (1, len(pictures)):
        raise InputError(
            f"Got {len(pictures)} images but {mask.shape[0]} masks: give one mask, or one mask per image."
        )
    masks = mask.expand(len(pictures), -1, -1) if mask.shape[0] == 1 else mask
    return list(zip(pictures, masks))

