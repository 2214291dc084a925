"""The per-step estimate the Sampler's live previews show: what it is, that it changes nothing, and that nothing is
unpacked for it when previews are off."""

from pathlib import Path

import torch
from PIL import Image

from generation import run as run_generation

ASSETS = Path(__file__).resolve().parents[1] / "assets"
RUN = dict(width=64, height=48, steps=3, seed=4, max_sequence_length=32, decode=False, batch_size=2)


def _features(tiny_encoders):
    return tiny_encoders.encode([Image.open(ASSETS / "reference_girl.png")])


def test_each_step_gives_the_denoised_estimate_and_the_last_one_is_the_result(tiny_flux, tiny_adapter,
                                                                              tiny_encoders):
    features = _features(tiny_encoders)
    seen = []
    with_previews = run_generation(tiny_flux, tiny_adapter, features, "a girl", **RUN, previews=True,
                                   on_step=lambda step, total, x0: seen.append((step, total, x0.clone())))
    plain_steps = []
    plain = run_generation(tiny_flux, tiny_adapter, features, "a girl", **RUN,
                           on_step=lambda *args: plain_steps.append(args))
    assert torch.equal(with_previews.latents, plain.latents)  # the previews change nothing
    assert plain_steps == [(1, 3, None), (2, 3, None), (3, 3, None)]  # without previews: no estimate
    assert [(s, t, None) for s, t, _ in seen] == plain_steps
    assert all(x0.shape == (2, 16, 6, 8) and x0.dtype == torch.float32 for _, _, x0 in seen)
    # the estimate moves towards the result, and the last step's estimate is the result (sigma goes to 0), in the
    # model latent space ComfyUI's Flux latent format gives its previewers: (vae latent - shift) * scale
    vae = tiny_flux.vae.config
    result = (with_previews.latents - vae.shift_factor) * vae.scaling_factor
    torch.testing.assert_close(seen[-1][2], result, rtol=0, atol=1e-5)
    errors = [(x0 - result).abs().mean().item() for _, _, x0 in seen]
    assert errors[0] > errors[1] > errors[2]


def test_without_previews_the_loop_unpacks_nothing(tiny_flux, tiny_adapter, tiny_encoders):
    features = _features(tiny_encoders)
    unpacked = []
    original = tiny_flux._unpack_latents

    def counting(*args, **kwargs):
        unpacked.append(args[0].shape)
        return original(*args, **kwargs)

    tiny_flux._unpack_latents = counting
    try:
        run_generation(tiny_flux, tiny_adapter, features, "a girl", **RUN, on_step=lambda *args: None)
        once = len(unpacked)
        run_generation(tiny_flux, tiny_adapter, features, "a girl", **RUN, previews=True,
                       on_step=lambda *args: None)
    finally:
        del tiny_flux._unpack_latents
    assert once == 1  # the result only
    assert len(unpacked) - once == 1 + RUN["steps"]
