"""Reference picture preparation: colour mode, mask, fit to a square, and the views the encoders see."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

from .errors import InputError

FitMode = Literal["stretch", "pad", "crop"]
FIT_MODES: tuple[str, ...] = ("stretch", "pad", "crop")
LOW_RES = 384
HIGH_RES = 768
WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image; transparency is composited onto white (the official references are on white)."""
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
    ``pad`` (centre on a white square, aspect kept) or ``crop`` (centre square, edges lost)."""
    image = to_rgb(image)
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
    array = (image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return Image.fromarray(array[..., 0], mode="L")
    return Image.fromarray(array, mode="RGBA" if array.shape[-1] == 4 else "RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL to a ComfyUI-style [H, W, 3] float tensor in 0–1."""
    return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32) / 255.0)


def references_from_batch(images: torch.Tensor, mask: torch.Tensor | None = None) -> list[Image.Image]:
    """A ComfyUI IMAGE batch [B, H, W, C] (+ optional MASK [B or 1, H, W], 1 = character) → PIL pictures
    with the background painted white where the mask is 0."""
    if images.ndim == 3:
        images = images[None]
    pictures = [tensor_to_pil(im) for im in images]
    if mask is None:
        return pictures
    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[0] not in (1, len(pictures)):
        raise InputError(
            f"Got {len(pictures)} images but {mask.shape[0]} masks: give one mask, or one mask per image."
        )
    masks = mask.expand(len(pictures), -1, -1) if mask.shape[0] == 1 else mask
    return [apply_mask(p, m) for p, m in zip(pictures, masks)]
