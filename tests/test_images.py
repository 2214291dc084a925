import numpy as np
import pytest
import torch
from PIL import Image

from instantcharacter.errors import InputError
from instantcharacter.reference.images import (
    apply_mask, fit_square, pil_to_tensor, reference_views, split_batch, tensor_to_pil, to_rgb,
)


def _portrait(w=60, h=100):
    """Red left half, blue right half, a green 10-px bar at the top."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    a[:10] = (0, 255, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize("fit,side", [("stretch", 100), ("pad", 100), ("crop", 60)])
def test_fit_modes_give_squares(fit, side):
    out = fit_square(_portrait(), fit)
    assert out.size == (side, side) and out.mode == "RGB"


def test_pad_keeps_aspect_on_white():
    out = np.asarray(fit_square(_portrait(), "pad"))
    assert (out[:, :20] == 255).all() and (out[:, -20:] == 255).all()  # 20-px white borders left and right
    assert tuple(out[50, 25]) == (255, 0, 0) and tuple(out[50, 75]) == (0, 0, 255)
    assert tuple(out[5, 50]) == (0, 255, 0)


def test_crop_takes_the_centre():
    out = np.asarray(fit_square(_portrait(), "crop"))
    assert tuple(out[30, 10]) == (255, 0, 0) and tuple(out[30, 50]) == (0, 0, 255)
    assert not (out == (0, 255, 0)).all(-1).any()  # the green top bar (rows 0-9) is cropped away


def test_stretch_fills_the_square():
    out = np.asarray(fit_square(_portrait(), "stretch"))
    assert tuple(out[50, 2]) == (255, 0, 0) and tuple(out[50, 97]) == (0, 0, 255)
    assert not (out == 255).all(-1).any()


def test_unknown_fit_mode():
    with pytest.raises(InputError, match="stretch, pad, crop"):
        fit_square(_portrait(), "zoom")


def test_views_are_low_res_and_four_ordered_tiles():
    a = np.zeros((200, 200, 3), np.uint8)
    a[:100, :100], a[:100, 100:], a[100:, :100], a[100:, 100:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)
    views = reference_views(Image.fromarray(a))
    assert [v.size for v in views] == [(384, 384)] * 5
    centres = [tuple(np.asarray(v)[192, 192]) for v in views[1:]]
    assert centres == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]  # TL, TR, BL, BR


def test_rgba_composites_onto_white_and_grayscale_becomes_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(to_rgb(rgba))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[4, 4]) == (255, 255, 255)
    gray = to_rgb(Image.new("L", (8, 6), 77))
    assert gray.mode == "RGB" and gray.size == (8, 6) and tuple(np.asarray(gray)[0, 0]) == (77, 77, 77)
    assert fit_square(Image.new("LA", (8, 6)), "pad").size == (8, 8)


def test_mask_paints_background_white():
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    mask = torch.zeros(4, 4)
    mask[1:3, 1:3] = 1
    out = np.asarray(apply_mask(image, mask))
    assert tuple(out[1, 1]) == (10, 20, 30) and tuple(out[0, 0]) == (255, 255, 255)
    with pytest.raises(InputError, match="same picture"):
        apply_mask(image, torch.zeros(5, 4))


def test_comfy_batch_with_one_or_many_masks():
    batch = torch.full((3, 4, 4, 3), 0.5)
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = 1
    pairs = split_batch(batch, mask)  # what Encode Reference does, then the mask is applied per picture
    pictures = [apply_mask(p, m) for p, m in pairs]
    assert len(pictures) == 3
    assert all(tuple(np.asarray(p)[0, 0]) == (128, 128, 128) and tuple(np.asarray(p)[3, 3]) == (255,) * 3
               for p in pictures)
    with pytest.raises(InputError, match="3 images but 2 masks"):
        split_batch(batch, torch.zeros(2, 4, 4))
    assert [m for _, m in split_batch(batch)] == [None] * 3


def test_tensor_round_trip():
    t = torch.rand(5, 7, 3)
    back = pil_to_tensor(tensor_to_pil(t))
    assert back.shape == (5, 7, 3) and (back - t).abs().max() <= 0.5 / 255 + 1e-6
    assert tensor_to_pil(torch.rand(5, 7, 4)).mode == "RGBA"
    assert tensor_to_pil(torch.rand(5, 7, 1)).mode == "L"
