"""The contact sheet: pictures in a numbered grid, each with the start of its caption under it, the whole sheet
bounded in size (a storyboard's panels; the Contact Sheet node's pictures)."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..reference.images import tensor_to_pil

SHEET_CELL = 512  # a panel's longer side on the sheet at most (smaller panels keep their size)
SHEET_MAX_SIDE = 8192  # the whole sheet's longer side at most: long boards get smaller cells
SHEET_BACKGROUND = (255, 255, 255)
SHEET_TEXT = (20, 20, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(images: Sequence, captions: Sequence[str] | None = None, columns: int | None = None,
                  cell: int = SHEET_CELL) -> Image.Image:
    """The panels in a grid, left to right and top to bottom, each numbered (from 1) under its picture with the
    start of its caption. ``images``: [H, W, 3] tensors in 0–1 or PIL pictures, any sizes."""
    pictures = [im if isinstance(im, Image.Image) else tensor_to_pil(im) for im in images]
    if not pictures:
        raise InputError("A contact sheet needs at least one picture.")
    count = len(pictures)
    columns = max(1, min(count, columns or math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    widest = max(p.width for p in pictures)
    tallest = max(p.height for p in pictures)
    cell = min(cell, SHEET_MAX_SIDE // columns, SHEET_MAX_SIDE // rows)
    scale = min(1.0, cell / max(widest, tallest))
    cell_w, cell_h = max(1, round(widest * scale)), max(1, round(tallest * scale))
    band = max(14, round(cell_h * 0.12))
    gap = max(4, round(cell_w * 0.03))
    sheet = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + band + gap) + gap), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(max(9, round(band * 0.7)))
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        x, y = gap + column * (cell_w + gap), gap + row * (cell_h + band + gap)
        shrunk = picture.convert("RGB")
        if scale < 1:
            shrunk = shrunk.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                   Image.LANCZOS)
        sheet.paste(shrunk, (x + (cell_w - shrunk.width) // 2, y + (cell_h - shrunk.height) // 2))
        caption = f"{index + 1}" + (f"  {captions[index]}" if captions and index < len(captions) else "")
        draw.text((x, y + cell_h + band // 2), _fit_text(draw, caption, font, cell_w), fill=SHEET_TEXT, font=font,
                  anchor="lm")
    return sheet
