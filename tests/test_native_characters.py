"""The characters of the native path without ComfyUI: what one Apply keeps between model calls."""

from pathlib import Path

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def features(tiny_encoders):
    return tiny_encoders.encode([Image.open(Path(__file__).resolve().parents[1] / "assets" / "reference_girl.png")])


def test_the_device_keeps_one_sigmas_tokens_and_each_sigma_is_projected_once(tiny_adapter, features, monkeypatch):
    """What the character holds on the device between model calls: one token set (the negative and positive
    passes of a step share it), not one per step (before: up to 256 sigmas' tokens, uncounted by ComfyUI)."""
    from instantcharacter.run.native import CharacterEntry

    entry = CharacterEntry(tiny_adapter, features, 0.9)
    projected = []
    tokens = tiny_adapter.image_proj.tokens
    monkeypatch.setattr(tiny_adapter.image_proj, "tokens", lambda *a: projected.append(1) or tokens(*a))
    query = torch.randn(2, 6, tiny_adapter.hidden_size)
    for sigma in (1.0, 1.0, 0.75, 0.75, 0.5, 0.25):  # cond and uncond called apart at each sigma
        entry.attention(0, query, sigma)
        held = [v for v in vars(entry).values() if isinstance(v, torch.Tensor)]
        assert len(held) == 2  # the merged features and this sigma's tokens
    assert len(projected) == 4
    entry.reset()
    assert not [v for v in vars(entry).values() if isinstance(v, torch.Tensor)]
