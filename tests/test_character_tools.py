"""Reference preparation, fusing and blending characters, and the consistency score."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instantcharacter.reference.consistency import consistency_scores
from instantcharacter.reference.character import ReferenceFeatures
from instantcharacter.errors import InputError
from instantcharacter.reference.images import character_box, prepare_reference

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _scene(w=200, h=120, box=(50, 30, 90, 100), colour=(200, 30, 30), background=(255, 255, 255)):
    a = np.full((h, w, 3), background, np.uint8)
    left, top, right, bottom = box
    a[top:bottom, left:right] = colour
    return Image.fromarray(a)


def test_box_from_mask_alpha_and_white_background():
    image = _scene(background=(0, 0, 0))
    mask = torch.zeros(120, 200)
    mask[30:100, 50:90] = 1
    assert character_box(image, mask) == (50, 30, 90, 100)
    rgba = Image.new("RGBA", (200, 120), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (40, 70), (9, 9, 9, 255)), (50, 30))
    assert character_box(rgba) == (50, 30, 90, 100)
    assert character_box(_scene()) == (50, 30, 90, 100)
    assert character_box(Image.new("RGB", (8, 8), "white")) is None


def test_prepare_crops_to_the_character_with_margin():
    # character 40×70 at (50, 30); margin 0.1 × 70 = 7 px on every side → 54×84, padded to 84×84
    square = prepare_reference(_scene(), "pad", crop=True, margin=0.1)
    assert square.size == (84, 84)
    a = np.asarray(square)
    red = (a == (200, 30, 30)).all(-1)
    rows, cols = np.flatnonzero(red.any(1)), np.flatnonzero(red.any(0))
    assert (rows[0], rows[-1] + 1) == (7, 77)  # 7 px margin above and below
    assert (cols[-1] + 1 - cols[0]) == 40 and cols[0] == (84 - 54) // 2 + 7
    # without crop the whole picture is kept
    assert prepare_reference(_scene(), "pad").size == (200, 200)


def test_prepare_with_mask_whitens_the_background_then_crops():
    image = _scene(background=(0, 120, 0))
    mask = torch.zeros(120, 200)
    mask[30:100, 50:90] = 1
    square = np.asarray(prepare_reference(image, "pad", mask=mask, crop=True, margin=0.0))
    assert square.shape == (70, 70, 3)
    assert not (square == (0, 120, 0)).all(-1).any()  # no green background left
    assert (square[:, :15] == 255).all()


def test_fusion_weights_one_and_zero_reproduce_a_single_reference(tiny_encoders):
    a = Image.open(ASSETS / "reference_girl.png")
    b = Image.open(ASSETS / "img2img_scene.png")
    only_a = tiny_encoders.encode([a])
    weighted = tiny_encoders.encode([a, b], weights=[1.0, 0.0])
    for x, y in zip(only_a.tensors(), weighted.tensors()):
        torch.testing.assert_close(x, y)
    with pytest.raises(InputError, match="weight"):
        tiny_encoders.encode([a, b], weights=[1.0])


def test_blending_two_characters_is_linear(tiny_encoders):
    a = tiny_encoders.encode([Image.open(ASSETS / "reference_girl.png")])
    b = tiny_encoders.encode([Image.open(ASSETS / "img2img_scene.png")])
    for ratio in (0.0, 0.3, 1.0):
        mix = ReferenceFeatures.blend([a, b], [1 - ratio, ratio])
        for x, y, m in zip(a.tensors(), b.tensors(), mix.tensors()):
            torch.testing.assert_close(m, (1 - ratio) * x + ratio * y, atol=1e-6, rtol=1e-5)


def test_consistency_is_one_for_the_same_picture_and_lower_for_another(tiny_encoders):
    girl = Image.open(ASSETS / "reference_girl.png")
    other = Image.open(ASSETS / "img2img_scene.png")
    scores = consistency_scores(tiny_encoders, [girl], [girl, other, girl.transpose(Image.FLIP_LEFT_RIGHT)])
    assert scores.siglip[0] == pytest.approx(1.0, abs=1e-5) and scores.dino[0] == pytest.approx(1.0, abs=1e-5)
    assert scores.combined[1] < scores.combined[0] - 1e-3
    assert scores.best == 0
    assert "best: image 0" in scores.report()
