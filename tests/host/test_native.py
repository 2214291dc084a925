"""The native path against ComfyUI's own FLUX model, in-process (needs COMFYUI_DIR and ComfyUI's Python).

Equivalence: a tiny FLUX in ComfyUI's format holding the same weights as the tiny diffusers transformer,
the same character, noise, sigmas and conditioning → the native patch and the pipeline path agree.
"""

import copy
import importlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def comfy_flux(comfy, tiny_flux):
    model = _comfy_twin(tiny_flux.transformer, torch.float32, comfy.ops.disable_weight_init)
    missing, unexpected = model.load_state_dict(_comfy_state_dict(tiny_flux.transformer), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model.eval()


def _comfy_state_dict(transformer):
    """The BFL state dict of a diffusers transformer as ComfyUI's FLUX model config hands it to the model
    (v0.33 renames the q/k norms' ``scale`` to ``weight``)."""
    import comfy.supported_models

    from instantcharacter.testing.single_file import bfl_flux_state_dict

    config = comfy.supported_models.Flux({"image_model": "flux", "guidance_embed": True})
    return config.process_unet_state_dict(bfl_flux_state_dict(transformer))


def _comfy_twin(t, dtype, operations, **extra):
    """ComfyUI's FLUX model class at the tiny diffusers transformer's sizes (on either ComfyUI generation)."""
    from comfy.ldm.flux.model import Flux, FluxParams

    cfg = t.config
    params = dict(in_channels=16, out_channels=16, vec_in_dim=cfg.pooled_projection_dim,
                  context_in_dim=cfg.joint_attention_dim, hidden_size=t.inner_dim, mlp_ratio=4.0,
                  num_heads=cfg.num_attention_heads, depth=cfg.num_layers, depth_single_blocks=cfg.num_single_layers,
                  axes_dim=list(cfg.axes_dims_rope), theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                  txt_ids_dims=[], **extra)
    fields = FluxParams.__dataclass_fields__
    unknown = set(extra) - set(fields)
    if unknown:
        pytest.skip(f"this ComfyUI's FLUX has no {', '.join(sorted(unknown))}")
    return Flux(**{k: v for k, v in params.items() if k in fields}, dtype=dtype, operations=operations)


def _inputs(flux, batch=2, side=8, text_len=9):
    g = torch.Generator().manual_seed(4)
    cfg = flux.transformer.config
    return (torch.randn(batch, 16, side, side, generator=g),
            torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
            torch.randn(batch, cfg.pooled_projection_dim, generator=g))


def _pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x, h, w):
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def _patches(pack, comfy_flux, entries, previous=None):
    """transformer_options carrying the pack's block patches and its DIFFUSION_MODEL wrapper, as Apply sets
    them on a MODEL (an OUTER_SAMPLE run is not involved in these direct calls)."""
    from instantcharacter.run.native_characters import CharacterSet

    characters = CharacterSet(tuple(entries))
    patches = {}
    n_double = len(comfy_flux.double_blocks)
    for kind, blocks, offset in (("double", comfy_flux.double_blocks, 0), ("single", comfy_flux.single_blocks, n_double)):
        for i in range(len(blocks)):
            before = (previous or {}).get((f"{kind}_block", i))
            patches[(f"{kind}_block", i)] = pack.block_patch.CharacterBlockPatch(kind, i, offset + i, characters,
                                                                                 before)
    wrapper = pack.model_wrappers.diffusion_model_wrapper(characters)
    return {"patches_replace": {"dit": patches}, "wrappers": {"diffusion_model": {"instantcharacter": [wrapper]}}}


def _comfy_call(comfy_flux, x, ctx, pooled, sigma, patched, cond_or_uncond=None, **kwargs):
    batch = x.shape[0]
    options = {**patched, "sigmas": torch.full([batch], sigma), "cond_or_uncond": cond_or_uncond or [0]}
    with torch.inference_mode():
        return comfy_flux(x, torch.full([batch], sigma), ctx, y=pooled, guidance=torch.full([batch], 3.5),
                          transformer_options=options, **kwargs)


def _diffusers_call(flux, adapter, features, x, ctx, pooled, sigma, scale):
    """One call of the diffusers transformer (the pipeline path) with the character at ``scale`` in every layer;
    ``features``: one character's, or a list of (features, weight per generated token) pairs."""
    from instantcharacter.model.processors import attach

    characters = features if isinstance(features, list) else [(features, None)]
    t = flux.transformer
    b, _, h, w = x.shape
    ids = torch.zeros(h // 2 * w // 2, 3)
    ids[:, 1], ids[:, 2] = torch.arange(h // 2 * w // 2) // (w // 2), torch.arange(h // 2 * w // 2) % (w // 2)
    with torch.inference_mode(), attach(t, adapter) as att:
        att.context.image_seq_len = ids.shape[0]
        att.context.layer_scales = dict.fromkeys(range(adapter.num_layers), scale)
        if scale:
            att.context.characters = tuple((adapter.image_proj(*f.tensors(), torch.tensor([sigma * 1000.0])), weight)
                                           for f, weight in characters)
        out = t(hidden_states=_pack(x), timestep=torch.full([b], sigma), guidance=torch.full([b], 3.5),
                pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=torch.zeros(ctx.shape[1], 3),
                img_ids=ids, return_dict=False)[0]
    return _unpack(out, h, w)


def test_one_model_call_matches_the_pipeline_path(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)
    entry = AppliedCharacter(tiny_adapter, features, 0.9)
    native = _comfy_call(comfy_flux, x, ctx, pooled, 0.7, _patches(pack, comfy_flux, [entry]))
    pipeline = _diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, 0.7, 0.9)
    plain = _diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, 0.7, 0.0)
    diff = (native - pipeline).abs().max().item()
    print(f"\nnative vs pipeline, one model call: max diff {diff:.2e} (character effect {(pipeline - plain).abs().max():.2e})")
    assert diff <= 1e-5
    assert (pipeline - plain).abs().max() > 1e-3  # the character really acts


def test_a_few_euler_steps_match(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x0, ctx, pooled = _inputs(tiny_flux, batch=1)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    entry = AppliedCharacter(tiny_adapter, features, 0.9)
    patches = _patches(pack, comfy_flux, [entry])
    a = b = x0
    for s, s_next in zip(sigmas, sigmas[1:]):
        a = a + (s_next - s) * _comfy_call(comfy_flux, a, ctx, pooled, s, patches)
        b = b + (s_next - s) * _diffusers_call(tiny_flux, tiny_adapter, features, b, ctx, pooled, s, 0.9)
    diff = (a - b).abs().max().item()
    print(f"\nnative vs pipeline, 4 Euler steps: max diff {diff:.2e}")
    assert diff <= 1e-5


def test_weight_zero_and_outside_the_window_are_exactly_unpatched(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)
    plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, {})
    off = AppliedCharacter(tiny_adapter, features, 0.0)
    zero = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [off]))
    late = AppliedCharacter(tiny_adapter, features, 0.9, sigma_start=0.5, sigma_end=0.0)  # acts only below 0.5
    outside = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [late]))
    inside = _comfy_call(comfy_flux, x, ctx, pooled, 0.4, _patches(pack, comfy_flux, [late]))
    assert torch.equal(zero, plain) and torch.equal(outside, plain)
    assert (inside - _comfy_call(comfy_flux, x, ctx, pooled, 0.4, {})).abs().max() > 1e-3


def test_negative_pass_can_be_left_alone(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)  # batch 2 = [cond, uncond]
    plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, {}, [0, 1])
    entry = AppliedCharacter(tiny_adapter, features, 0.9, on_negative=False)
    out = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [entry]), [0, 1])
    assert torch.equal(out[1], plain[1])
    assert (out[0] - plain[0]).abs().max() > 1e-3


def test_two_characters_compose_and_foreign_patches_are_kept(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)
    a = AppliedCharacter(tiny_adapter, features, 0.5)
    one = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [a]))
    b = AppliedCharacter(tiny_adapter, features, 0.4)
    both = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [a, b]))
    assert (both - one).abs().max() > 1e-4
    calls = []

    def foreign(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    previous = {("double_block", 0): foreign}
    wrapped = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [a], previous))
    assert calls and torch.allclose(wrapped, one, atol=1e-6)


def test_apply_node_patches_a_clone_only(pack, comfy, comfy_flux, tiny_adapter, features):
    import comfy.model_patcher

    native = importlib.import_module("instantcharacter_pack_native.nodes.apply")

    class Sampling:
        def percent_to_sigma(self, p):
            return 1.0 - p

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = comfy_flux
            self.model_sampling = Sampling()

    model = comfy.model_patcher.ModelPatcher(Base(), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    before = copy.deepcopy(model.model_options)
    out = native.ApplyToModel.execute(model, tiny_adapter, features, 0.9, 0.0, 1.0, True)
    patched = out.args[0] if hasattr(out, "args") else out[0]
    assert model.model_options == before  # the input MODEL is unchanged
    dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert len(dit) == len(comfy_flux.double_blocks) + len(comfy_flux.single_blocks)
    again = native.ApplyToModel.execute(patched, tiny_adapter, features, 0.5, 0.0, 1.0, True)
    twice = again.args[0] if hasattr(again, "args") else again[0]
    assert len(twice.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].characters.entries) == 2
    assert len(dit[("double_block", 0)].characters.entries) == 1  # the first patched MODEL is unchanged too
    assert twice.get_additional_models() == patched.get_additional_models()  # one adapter, one patcher


def test_fp8_model_through_comfyuis_manual_cast(pack, comfy, tiny_flux, tiny_adapter, features, tmp_path):
    """A MODEL as ComfyUI's Load Diffusion Model makes it with weight_dtype fp8_e4m3fn: weights stored in fp8,
    computed through comfy.ops.manual_cast. The patch must give what the pipeline path gives for the same
    (fp8-rounded) weights."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from instantcharacter.run.native_characters import AppliedCharacter
    from instantcharacter.files.single_file import load_flux_transformer

    model = _comfy_twin(tiny_flux.transformer, torch.float8_e4m3fn, comfy.ops.manual_cast)
    model.load_state_dict(_comfy_state_dict(tiny_flux.transformer))  # rounds every weight to fp8
    model.eval()
    assert next(model.double_blocks[0].parameters()).dtype == torch.float8_e4m3fn
    rounded = tmp_path / "flux1-dev-fp8-rounded.safetensors"
    save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, str(rounded))
    twin = SimpleNamespace(transformer=load_flux_transformer(rounded, dtype=torch.float32))

    x, ctx, pooled = _inputs(tiny_flux)
    entry = AppliedCharacter(tiny_adapter, features, 0.9)
    native = _comfy_call(model, x, ctx, pooled, 0.7, _patches(pack, model, [entry]))
    plain = _comfy_call(model, x, ctx, pooled, 0.7, {})
    pipeline = _diffusers_call(twin, tiny_adapter, features, x, ctx, pooled, 0.7, 0.9)
    diff = (native - pipeline).abs().max().item()
    print(f"\nfp8 MODEL (manual_cast) native vs pipeline on the same rounded weights: max diff {diff:.2e}")
    assert diff <= 1e-5
    assert (native - plain).abs().max() > 1e-3


# --- callers, stacking, schedule, regions, wrong models ------------------------------------------------------

class _CallerWithoutOptions(dict):
    """A "dit" patch table as packs that run FLUX's blocks themselves use it: the patch is called without
    ``transformer_options`` in its arguments (TeaCache-style) or with them in the second dict (PuLID-Flux-ll)."""

    def __init__(self, patches, in_second_dict: bool):
        super().__init__(patches)
        self.in_second_dict = in_second_dict

    def __getitem__(self, key):
        patch = super().__getitem__(key)

        def call(args, extra):
            options = args.get("transformer_options", {})
            original = extra["original_block"]
            second = {"original_block": lambda a: original({**a, "transformer_options": options})}
            if self.in_second_dict:
                second["transformer_options"] = options
            return patch({k: v for k, v in args.items() if k != "transformer_options"}, second)

        return call


@pytest.mark.parametrize("in_second_dict", [False, True], ids=["teacache_style", "pulid_style"])
def test_callers_that_pass_no_options_keep_the_window_and_the_negative_switch(
        pack, comfy_flux, tiny_flux, tiny_adapter, features, in_second_dict):
    from instantcharacter.run.native_characters import AppliedCharacter

    def run(entry, sigma, chunks=(0, 1)):
        patched = _patches(pack, comfy_flux, [entry])
        dit = patched["patches_replace"]["dit"]
        patched["patches_replace"]["dit"] = _CallerWithoutOptions(dit, in_second_dict)
        return _comfy_call(comfy_flux, x, ctx, pooled, sigma, patched, list(chunks))

    x, ctx, pooled = _inputs(tiny_flux)
    plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, {}, [0, 1])
    late = AppliedCharacter(tiny_adapter, features, 0.9, sigma_start=0.5, sigma_end=0.0)
    assert torch.equal(run(late, 0.6), plain)  # outside its window: not applied
    positive_only = AppliedCharacter(tiny_adapter, features, 0.9, on_negative=False)
    out = run(positive_only, 0.6)
    assert torch.equal(out[1], plain[1]) and (out[0] - plain[0]).abs().max() > 1e-3
    normal = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [positive_only]), [0, 1])
    assert torch.equal(out, normal)


def test_pulid_stacks_its_callbacks_on_our_patch_with_add(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)
    entry = AppliedCharacter(tiny_adapter, features, 0.9)
    ours = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [entry]))
    calls = []

    def pulid_like(img, pulid_model=None, ca_idx=None, weight=1.0, embedding=None, mask=None, transformer_options={}):
        calls.append((img.shape, ca_idx, "sigmas" in transformer_options))
        return weight * torch.randn(img.shape, generator=torch.Generator().manual_seed(ca_idx))

    patched = _patches(pack, comfy_flux, [entry])
    dit = patched["patches_replace"]["dit"]
    # as PuLID-Flux-ll does when a block already has a patch: .add(callback, **its settings)
    dit[("double_block", 1)].add(pulid_like, sigma_start=1.0, sigma_end=0.0, pulid_model=None, ca_idx=0, weight=0.0,
                                 embedding=None, mask=None)
    dit[("single_block", 0)].add(pulid_like, sigma_start=0.5, sigma_end=0.0, pulid_model=None, ca_idx=1, weight=1.0,
                                 embedding=None, mask=None)
    stacked = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, patched)
    assert torch.equal(stacked, ours)  # weight 0 in its window, and the other outside its window
    assert calls == [(torch.Size([2, 16, 256]), 0, True)]
    dit[("single_block", 0)].stacked[0][1]["sigma_start"] = 1.0
    changed = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, patched)
    assert calls[-1] == (torch.Size([2, 16, 256]), 1, True)  # single block: only the image rows
    assert (changed - ours).abs().max() > 1e-3


def test_a_foreign_patch_registered_after_ours_does_not_crash(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)
    plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, {})
    patched = _patches(pack, comfy_flux, [AppliedCharacter(tiny_adapter, features, 0.9)])
    patched["patches_replace"]["dit"][("double_block", 0)] = lambda args, extra: extra["original_block"](args)
    out = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, patched)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3  # the other blocks still act


def _first_block_output(pack, comfy_flux, x, ctx, pooled, entries, sigma=0.6, **kwargs):
    """The image stream leaving double block 0: after it every row is computed on its own, so a character
    that must not touch a row leaves that row bit-identical there."""
    seen = {}

    def capture(args, extra):
        out = extra["original_block"](args)
        seen["img"] = out["img"].clone()
        return out

    patched = _patches(pack, comfy_flux, entries, previous={("double_block", 0): capture})
    _comfy_call(comfy_flux, x, ctx, pooled, sigma, patched, **kwargs)
    return seen["img"]


def test_kontext_reference_tokens_are_left_alone(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)  # 8×8 latent: 16 generated tokens
    reference = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    plain = _first_block_output(pack, comfy_flux, x, ctx, pooled, [], ref_latents=[reference])
    ours = _first_block_output(pack, comfy_flux, x, ctx, pooled, [AppliedCharacter(tiny_adapter, features, 0.9)],
                               ref_latents=[reference])
    assert ours.shape[1] == 32
    assert torch.equal(ours[:, 16:], plain[:, 16:])  # the reference image's tokens
    assert (ours[:, :16] - plain[:, :16]).abs().max() > 1e-3


def test_a_region_confines_the_character_and_two_regions_split_the_picture(
        pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    x, ctx, pooled = _inputs(tiny_flux)
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1.0
    right = 1.0 - left
    columns = torch.arange(16) % 4  # the 4×4 token grid, row by row
    in_left, in_right = columns < 2, columns >= 2
    plain = _first_block_output(pack, comfy_flux, x, ctx, pooled, [])
    on_left = AppliedCharacter(tiny_adapter, features, 0.9, mask=left)
    on_right = AppliedCharacter(tiny_adapter, features, 0.4, mask=right)
    a = _first_block_output(pack, comfy_flux, x, ctx, pooled, [on_left])
    b = _first_block_output(pack, comfy_flux, x, ctx, pooled, [on_right])
    both = _first_block_output(pack, comfy_flux, x, ctx, pooled, [on_left, on_right])
    assert torch.equal(a[:, in_right], plain[:, in_right]) and (a[:, in_left] - plain[:, in_left]).abs().max() > 1e-3
    assert torch.equal(b[:, in_left], plain[:, in_left]) and (b[:, in_right] - plain[:, in_right]).abs().max() > 1e-3
    assert torch.equal(both[:, in_left], a[:, in_left]) and torch.equal(both[:, in_right], b[:, in_right])
    everywhere = _first_block_output(pack, comfy_flux, x, ctx, pooled, [AppliedCharacter(tiny_adapter, features, 0.9)])
    ones = _first_block_output(pack, comfy_flux, x, ctx, pooled,
                               [AppliedCharacter(tiny_adapter, features, 0.9, mask=torch.ones(1, 64, 64))])
    assert torch.equal(ones, everywhere)


def _overlapping_halves(side=64):
    """Masks for a 4×4 token grid: the left one covers columns 0–2, the right one 1–3, softly in column 3."""
    left, right = torch.zeros(side, side), torch.zeros(side, side)
    left[:, : 3 * side // 4] = 1.0
    right[:, side // 4:] = 1.0
    right[:, 3 * side // 4:] = 0.6
    return left, right


def test_regional_characters_act_the_same_on_both_paths(pack, comfy_flux, tiny_flux, tiny_adapter, features,
                                                        tiny_encoders):
    """Overlapping regions, a soft edge and a per-character strength: one model call of the native path (two
    Apply entries with masks) and of the pipeline path (the weights Combine Characters gives the Sampler) agree."""
    from PIL import Image

    from instantcharacter.reference.character import RegionalCharacter
    from instantcharacter.run.native_characters import AppliedCharacter
    from instantcharacter.run.regions import character_weights

    waving = tiny_encoders.encode([Image.open(ROOT / "assets" / "reference_girl_wave.png")])
    left, right = _overlapping_halves()
    x, ctx, pooled = _inputs(tiny_flux)
    sigma = 0.7
    entries = [AppliedCharacter(tiny_adapter, features, 0.9, mask=left),
               AppliedCharacter(tiny_adapter, waving, 0.45, mask=right)]
    native = _comfy_call(comfy_flux, x, ctx, pooled, sigma, _patches(pack, comfy_flux, entries))

    weighted = character_weights((RegionalCharacter(features, left), RegionalCharacter(waving, right, 0.5)), (4, 4))
    pipeline = _diffusers_call(tiny_flux, tiny_adapter, [(m.features, weight) for m, weight in weighted], x, ctx,
                               pooled, sigma, 0.9)
    plain = _diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, sigma, 0.0)
    diff = (native - pipeline).abs().max().item()
    print(f"\nregional characters, native vs pipeline: max diff {diff:.2e} "
          f"(their effect {(pipeline - plain).abs().max():.2e})")
    assert diff <= 1e-5 and (pipeline - plain).abs().max() > 1e-3


def test_apply_takes_regional_and_combined_characters(pack, comfy, comfy_flux, tiny_adapter, features, tiny_encoders):
    from PIL import Image

    from instantcharacter.reference.character import Characters, RegionalCharacter

    waving = tiny_encoders.encode([Image.open(ROOT / "assets" / "reference_girl_wave.png")])
    left, right = _overlapping_halves()
    model = _model_patcher(comfy, comfy_flux)
    combined = _apply(model, tiny_adapter, Characters((RegionalCharacter(features, left),
                                                       RegionalCharacter(waving, right, 0.5))))
    chained = _apply(_apply(model, tiny_adapter, features, mask=left), tiny_adapter, waving, weight=0.45, mask=right)

    def entries(patched):
        dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
        return dit[("double_block", 0)].characters.entries

    for one, other in zip(entries(combined), entries(chained), strict=True):
        assert one.features is other.features and one.weight == other.weight and torch.equal(one.mask, other.mask)
    # Apply's own mask serves a character without a region; a second region is refused by name
    regional = _apply(model, tiny_adapter, RegionalCharacter(features, strength=0.5), mask=left)
    [entry] = entries(regional)
    assert entry.weight == 0.45 and entry.mask is left
    with pytest.raises(ValueError, match="Apply's mask is connected and the character already has a region"):
        _apply(model, tiny_adapter, RegionalCharacter(features, left), mask=right)


def test_character_off_is_bit_identical_with_references_and_an_attention_mask(
        pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native_characters import AppliedCharacter

    silent = copy.deepcopy(tiny_adapter)
    with torch.no_grad():
        for layer in silent.ip_adapter:
            layer.to_v_ip.weight.zero_()
            layer.to_v_ip.bias.zero_()
    x, ctx, pooled = _inputs(tiny_flux)
    reference = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    length = ctx.shape[1] + 32
    mask = torch.zeros(2, 1, length, length)
    mask[..., -4:] = -10000.0  # the last reference tokens are not attended to
    for kwargs in ({}, {"ref_latents": [reference]}, {"ref_latents": [reference], "attention_mask": mask}):
        plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, {}, [0, 1], **kwargs)
        for entry in (AppliedCharacter(tiny_adapter, features, 0.0), AppliedCharacter(silent, features, 0.9),
                      AppliedCharacter(tiny_adapter, features, 0.9, sigma_start=0.5, sigma_end=0.0)):
            out = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [entry]), [0, 1], **kwargs)
            assert torch.equal(out, plain), (kwargs.keys(), entry.weight)


def _model_patcher(comfy, diffusion):
    import comfy.model_patcher
    import comfy.model_sampling

    class Base(torch.nn.Module):
        model_config = None

        def __init__(self):
            super().__init__()
            self.diffusion_model = diffusion
            self.model_sampling = comfy.model_sampling.ModelSamplingFlux()

    return comfy.model_patcher.ModelPatcher(Base(), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _apply(model, adapter, features, weight=0.9, start=0.0, end=1.0, negative=True, mask=None):
    native = importlib.import_module("instantcharacter_pack_native.nodes.apply")
    out = native.ApplyToModel.execute(model, adapter, features, weight, start, end, negative, mask)
    return out.args[0] if hasattr(out, "args") else out[0]


def test_the_window_follows_a_sampling_shift_placed_after_apply(pack, comfy, comfy_flux, tiny_adapter, features):
    import comfy_extras.nodes_model_advanced as advanced

    patched = _apply(_model_patcher(comfy, comfy_flux), tiny_adapter, features, start=0.25, end=0.75)
    node = advanced.ModelSamplingFlux
    shifted = node().patch(patched, 4.0, 2.0, 1024, 1024)
    shifted = shifted.args[0] if hasattr(shifted, "args") else shifted[0]
    sampling = shifted.get_model_object("model_sampling")
    assert sampling.percent_to_sigma(0.25) != patched.get_model_object("model_sampling").percent_to_sigma(0.25)
    wrappers = shifted.wrappers["outer_sample"]["instantcharacter"]
    assert len(wrappers) == 1

    class Guider:
        model_patcher = shifted
        model_options = shifted.model_options
        conds = {"positive": [{"uuid": "p"}], "negative": [{"uuid": "n"}]}

    guider = Guider()
    seen = {}

    class Executor:
        class_obj = guider

        def __call__(self, *args, **kwargs):
            run = guider.model_options["transformer_options"][pack.model_wrappers.RUN_KEY]
            seen.update(window=run.windows[0], negative=run.negative_uuids)
            return "sampled"

    assert wrappers[0](Executor()) == "sampled"
    assert seen["window"] == pytest.approx((sampling.percent_to_sigma(0.25), sampling.percent_to_sigma(0.75)))
    assert seen["negative"] == {"n"}  # the negative conditioning is told by its ids, not by its position
    # the run's state lived in the run's own copy of the options: the MODEL's are as they were
    assert guider.model_options is shifted.model_options and pack.model_wrappers.RUN_KEY not in shifted.model_options[
        "transformer_options"]


def test_the_negative_pass_is_told_by_the_negative_conditioning_not_by_position(tiny_adapter, features):
    from instantcharacter.run.native_characters import CharacterSet

    run = CharacterSet().run(None, {"neg"})
    # DualCFGGuider batches [negative, middle, positive]: chunk index 0 is the negative one there
    assert run.negative_rows(6, [0, 1, 2], ["neg", "mid", "pos"]) == (True, True, False, False, False, False)
    outside = CharacterSet().run()
    assert outside.negative_rows(4, [0, 1], ["a", "b"]) == (False, False, True, True)  # CFGGuider: 1 = uncond


def _unsupported_model_error():
    return importlib.import_module("instantcharacter_pack_native.instantcharacter.errors").UnsupportedModelError


def test_wrong_models_are_refused_at_apply_by_name(pack, comfy, tiny_flux, tiny_adapter, features):
    UnsupportedModelError = _unsupported_model_error()

    class NotFlux(torch.nn.Module):  # e.g. an SDXL UNet: no FLUX blocks at all
        def __init__(self):
            super().__init__()
            self.input_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match="NotFlux .*no FLUX double/single blocks"):
        _apply(_model_patcher(comfy, NotFlux()), tiny_adapter, features)

    wide = _comfy_twin(tiny_flux.transformer, torch.float32, comfy.ops.disable_weight_init)
    wide.double_blocks.append(copy.deepcopy(wide.double_blocks[0]))
    with pytest.raises(UnsupportedModelError, match="3\\+3 blocks"):
        _apply(_model_patcher(comfy, wide), tiny_adapter, features)

    import comfy.ldm.chroma.model as chroma

    cfg = tiny_flux.transformer.config
    params = dict(in_channels=16, out_channels=16, context_in_dim=cfg.joint_attention_dim, hidden_size=256,
                  mlp_ratio=4.0, num_heads=2, depth=cfg.num_layers, depth_single_blocks=cfg.num_single_layers,
                  axes_dim=list(cfg.axes_dims_rope), theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=256,
                  hidden_dim=64, n_layers=1, txt_ids_dims=[], vec_in_dim=cfg.pooled_projection_dim)
    fields = chroma.ChromaParams.__dataclass_fields__
    model = chroma.Chroma(**{k: v for k, v in params.items() if k in fields}, operations=comfy.ops.disable_weight_init)
    with pytest.raises(UnsupportedModelError, match="Chroma .*no per-block modulation"):
        _apply(_model_patcher(comfy, model), tiny_adapter, features)


def test_a_flux2_style_model_is_refused_at_apply(pack, comfy, tiny_flux, tiny_adapter, features):
    UnsupportedModelError = _unsupported_model_error()

    model = _comfy_twin(tiny_flux.transformer, torch.float32, comfy.ops.disable_weight_init, global_modulation=True)
    with pytest.raises(UnsupportedModelError, match="no per-block modulation"):
        _apply(_model_patcher(comfy, model), tiny_adapter, features)


def test_implausible_features_stop_the_call_by_name_instead_of_a_nan_picture(pack, comfy_flux, tiny_flux,
                                                                              tiny_adapter, features):
    """Features far outside the encoders' range (an edited character file that got past its checks) make the
    character's tokens NaN: the model call stops with a named error instead of returning a NaN picture."""
    import dataclasses

    from instantcharacter.run.native_characters import AppliedCharacter

    huge = dataclasses.replace(features, **{k: getattr(features, k) * 1e30 for k in
                                            ("low_res_shallow", "low_res_deep", "high_res_deep")})
    x, ctx, pooled = _inputs(tiny_flux)
    with pytest.raises(Exception, match="tokens at sigma 0.6 are not finite") as raised:
        _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [AppliedCharacter(tiny_adapter, huge, 0.9)]))
    assert type(raised.value).__name__ == "NonFiniteResultError"
