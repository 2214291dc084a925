"""The core end to end on tiny random models: encoders → projector → attention → generation."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from instantcharacter.model.processors import attach
from instantcharacter.errors import InputError
from instantcharacter.run.latents import flux_schedule
from instantcharacter.run.tokens import character_tokens
from generation import run as run_generation

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def reference():
    return Image.open(ASSETS / "reference_girl.png")


@pytest.fixture(scope="module")
def features(tiny_encoders, reference):
    return tiny_encoders.encode([reference], fit="stretch")


def test_feature_shapes(features, tiny_encoders):
    c = tiny_encoders.feature_dim
    assert features.low_res_deep.shape == (1, 729, c)
    assert features.low_res_shallow.shape == (1, 3 * 729, c)
    assert features.high_res_deep.shape == (1, 4 * 729, c)


@pytest.mark.parametrize("fit", ["stretch", "pad", "crop"])
def test_fit_modes_and_colour_modes_encode(tiny_encoders, reference, fit):
    rgba = reference.convert("RGBA")
    gray = reference.convert("L")
    for image in (reference, rgba, gray):
        f = tiny_encoders.encode([image], fit=fit)
        assert f.low_res_deep.shape == (1, 729, tiny_encoders.feature_dim)
        assert torch.isfinite(f.high_res_deep).all()


def test_fit_modes_change_the_features(tiny_encoders, reference):
    a = tiny_encoders.encode([reference], fit="stretch").low_res_deep
    b = tiny_encoders.encode([reference], fit="pad").low_res_deep
    assert (a - b).abs().max() > 1e-4


def test_several_views_fuse_to_the_mean(tiny_encoders, reference):
    flipped = reference.transpose(Image.FLIP_LEFT_RIGHT)
    one, two = tiny_encoders.encode([reference]), tiny_encoders.encode([flipped])
    fused = tiny_encoders.encode([reference, flipped])
    for a, b, f in zip(one.tensors(), two.tensors(), fused.tensors()):
        torch.testing.assert_close(f, (a + b) / 2, atol=1e-6, rtol=1e-5)
    weighted = tiny_encoders.encode([reference, flipped], weights=[1.0, 0.0])
    for a, w in zip(one.tensors(), weighted.tensors()):
        torch.testing.assert_close(w, a)


def test_precomputed_tokens_equal_per_step_recomputation(tiny_adapter, features, tiny_flux):
    timesteps = flux_schedule(tiny_flux.scheduler, 6, 16, "cpu")
    all_at_once = character_tokens(tiny_adapter, features, timesteps, torch.float32, chunk=4)
    proj = tiny_adapter.image_proj
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            full = proj(features.low_res_shallow, features.low_res_deep, features.high_res_deep, t[None])
            torch.testing.assert_close(all_at_once[i], full, atol=1e-5, rtol=1e-5)
    assert all_at_once.shape[0] == 6
    assert (all_at_once[0] - all_at_once[-1]).abs().max() > 1e-4  # the tokens do depend on the timestep


def _transformer_inputs(flux, batch=2, text_len=7, side=4):
    g = torch.Generator().manual_seed(3)
    cfg = flux.transformer.config
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    return dict(hidden_states=torch.randn(batch, side * side, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.full([batch], 0.6), guidance=torch.full([batch], 3.5),
                img_ids=ids, txt_ids=torch.zeros(text_len, 3), return_dict=False)


def test_scale_zero_equals_no_adapter_and_detach_restores(tiny_flux, tiny_adapter, features):
    transformer = tiny_flux.transformer
    inputs = _transformer_inputs(tiny_flux)
    before_procs = dict(transformer.attn_processors)
    before_weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    tokens = character_tokens(tiny_adapter, features, torch.tensor([600.0]), torch.float32)[0]
    with torch.inference_mode():
        plain = transformer(**inputs)[0]
        with attach(transformer, tiny_adapter) as att:
            att.context.image_seq_len = 16
            att.context.characters = ((tokens, None),)
            att.context.layer_scales = dict.fromkeys(range(tiny_adapter.num_layers), 0.0)
            zero = transformer(**inputs)[0]
            att.context.layer_scales = dict.fromkeys(range(tiny_adapter.num_layers), 1.0)
            full = transformer(**inputs)[0]
            assert all(type(p).__name__ == "CharacterFluxAttnProcessor" for p in transformer.attn_processors.values())
    assert (zero - plain).abs().max() <= 1e-6
    assert (full - plain).abs().max() > 1e-3
    after = transformer.attn_processors
    assert after.keys() == before_procs.keys() and all(after[k] is before_procs[k] for k in after)
    assert all(torch.equal(before_weights[k], v) for k, v in transformer.state_dict().items())


def test_per_layer_scale_override(tiny_flux, tiny_adapter, features):
    transformer = tiny_flux.transformer
    inputs = _transformer_inputs(tiny_flux)
    tokens = character_tokens(tiny_adapter, features, torch.tensor([600.0]), torch.float32)[0]
    with torch.inference_mode(), attach(transformer, tiny_adapter) as att:
        att.context.image_seq_len, att.context.characters = 16, ((tokens, None),)
        off = dict.fromkeys(range(tiny_adapter.num_layers), 0.0)
        att.context.layer_scales = off
        plain = transformer(**inputs)[0]
        att.context.layer_scales = {**off, tiny_adapter.num_layers - 1: 1.0}  # only the last single block
        last_only = transformer(**inputs)[0]
    assert (last_only - plain).abs().max() > 1e-4


def _run(flux, adapter, features, **kw):
    args = dict(width=64, height=64, steps=3, seed=7, max_sequence_length=32)
    args.update(kw)
    return run_generation(flux, adapter, features, "a girl in a red coat", **args)


def test_same_seed_same_latents_and_shapes(tiny_flux, tiny_adapter, features):
    a = _run(tiny_flux, tiny_adapter, features, batch_size=2)
    b = _run(tiny_flux, tiny_adapter, features, batch_size=2)
    assert a.latents.shape == (2, 16, 8, 8) and a.images.shape == (2, 64, 64, 3)
    assert torch.equal(a.latents, b.latents)
    assert (a.latents[0] - a.latents[1]).abs().max() > 1e-3  # the batch has different noise
    c = _run(tiny_flux, tiny_adapter, features, batch_size=2, seed=8)
    assert (a.latents - c.latents).abs().max() > 1e-3
    assert 0 <= a.images.min() and a.images.max() <= 1


def test_subject_scale_changes_and_zero_matches_plain_flux(tiny_flux, tiny_adapter, features):
    plain = _run(tiny_flux, None, None)
    zero = _run(tiny_flux, tiny_adapter, features, subject_scale=0.0)
    full = _run(tiny_flux, tiny_adapter, features, subject_scale=1.0)
    assert (zero.latents - plain.latents).abs().max() <= 1e-5
    assert (full.latents - plain.latents).abs().max() > 1e-3


def test_true_cfg_uses_the_negative_prompt(tiny_flux, tiny_adapter, features):
    base = _run(tiny_flux, tiny_adapter, features)
    cfg = _run(tiny_flux, tiny_adapter, features, negative_prompt="blurry", true_cfg=2.0)
    off = _run(tiny_flux, tiny_adapter, features, negative_prompt="blurry", true_cfg=1.0)
    assert torch.equal(base.latents, off.latents)
    assert (base.latents - cfg.latents).abs().max() > 1e-3


def test_img2img_keeps_the_input_at_low_denoise(tiny_flux, tiny_adapter, features):
    first = _run(tiny_flux, tiny_adapter, features)
    init = first.latents
    light = _run(tiny_flux, tiny_adapter, features, init_latents=init, denoise=0.2, seed=99)
    heavy = _run(tiny_flux, tiny_adapter, features, init_latents=init, denoise=1.0, seed=99)
    fresh = _run(tiny_flux, tiny_adapter, features, seed=99)
    assert torch.equal(heavy.latents, fresh.latents)  # denoise 1 ignores the input
    assert (light.latents - init).abs().mean() < (heavy.latents - init).abs().mean()
    with pytest.raises(InputError, match="16, 8, 8"):
        _run(tiny_flux, tiny_adapter, features, init_latents=torch.zeros(1, 16, 4, 4), denoise=0.5)


def test_progress_callback_and_cancel_leave_the_model_clean(tiny_flux, tiny_adapter, features):
    seen = []
    _run(tiny_flux, tiny_adapter, features, on_step=lambda s, t, denoised: seen.append((s, t, denoised)))
    assert seen == [(1, 3, None), (2, 3, None), (3, 3, None)]  # no previews asked for: no estimate

    class Cancelled(Exception):
        pass

    def cancel(step, total, denoised):
        if step == 2:
            raise Cancelled

    before = dict(tiny_flux.transformer.attn_processors)
    with pytest.raises(Cancelled):
        _run(tiny_flux, tiny_adapter, features, on_step=cancel, offload="sequential")
    after = tiny_flux.transformer.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in tiny_flux.transformer.modules())
    again = _run(tiny_flux, tiny_adapter, features)
    assert torch.isfinite(again.latents).all()


@pytest.mark.parametrize("mode", ["auto", "sequential"])
def test_offload_modes_give_the_same_result_on_cpu(tiny_flux, tiny_adapter, features, mode):
    base = _run(tiny_flux, tiny_adapter, features)
    other = _run(tiny_flux, tiny_adapter, features, offload=mode)
    assert torch.equal(base.latents, other.latents)


@pytest.mark.parametrize("width,height,message", [(65, 64, "multiple of 16 .*use 64 or 80"),
                                                  (64, 100, "multiple of 16 .*use 96 or 112"),
                                                  (8, 64, "outside 16–4096")])
def test_sizes_must_be_multiples_of_16_within_the_nodes_range(tiny_flux, tiny_adapter, features, width, height,
                                                              message):
    with pytest.raises(InputError, match=message):
        _run(tiny_flux, tiny_adapter, features, width=width, height=height)


def test_schedule_window_and_block_weights_at_their_extremes(tiny_flux, tiny_adapter, features):
    plain = _run(tiny_flux, None, None)
    full = _run(tiny_flux, tiny_adapter, features, subject_scale=1.0)
    # an empty window, or zero weight in both kinds of block, is plain FLUX
    for kw in (dict(start_percent=0.0, end_percent=0.0), dict(start_percent=1.0, end_percent=1.0),
               dict(double_blocks_weight=0.0, single_blocks_weight=0.0)):
        out = _run(tiny_flux, tiny_adapter, features, subject_scale=1.0, **kw)
        assert (out.latents - plain.latents).abs().max() <= 1e-5, kw
    # the whole window with weights 1 is the default (official) behaviour, bit for bit
    same = _run(tiny_flux, tiny_adapter, features, subject_scale=1.0, start_percent=0.0, end_percent=1.0,
                double_blocks_weight=1.0, single_blocks_weight=1.0)
    assert torch.equal(same.latents, full.latents)
    # each part does something on its own
    for kw in (dict(double_blocks_weight=0.0), dict(single_blocks_weight=0.0), dict(end_percent=0.5)):
        out = _run(tiny_flux, tiny_adapter, features, subject_scale=1.0, **kw)
        assert (out.latents - full.latents).abs().max() > 1e-4, kw
        assert (out.latents - plain.latents).abs().max() > 1e-4, kw
    with pytest.raises(InputError, match="start_percent"):
        _run(tiny_flux, tiny_adapter, features, start_percent=0.8, end_percent=0.2)


def test_true_cfg_projects_the_character_keys_and_values_once_per_step(tiny_flux, tiny_adapter, features,
                                                                       monkeypatch):
    """With true CFG and the character on both passes, each step projects each layer's character keys and
    values once (the negative pass reuses them), from one token row whatever the batch, and the latents equal
    those of projecting them in every pass (as before) within float rounding."""
    from instantcharacter.model.processors import CharacterContext

    kwargs = dict(negative_prompt="blurry", true_cfg=2.0, batch_size=2, steps=2)
    rows = []
    hooks = [layer.to_k_ip.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for layer in tiny_adapter.ip_adapter]
    try:
        shared = _run(tiny_flux, tiny_adapter, features, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == [1] * (tiny_adapter.num_layers * 2)  # 2 steps, 2 passes each, batch 2
    monkeypatch.setattr(CharacterContext, "keys_values",
                        lambda self, index, position, layer, tokens: layer.keys_values(tokens))
    every_pass = _run(tiny_flux, tiny_adapter, features, **kwargs)
    assert (shared.latents - every_pass.latents).abs().max() <= 1e-6
