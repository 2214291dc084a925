"""The native path against ComfyUI's own FLUX model, in-process (needs COMFYUI_DIR and ComfyUI's Python).

Equivalence: a tiny FLUX in ComfyUI's format holding the same weights as the tiny diffusers transformer,
the same character, noise, sigmas and conditioning → the native patch and the pipeline path agree.
"""

import copy
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui import SKIP_REASON, comfyui_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def comfy():
    if comfyui_dir() is None:
        pytest.skip(SKIP_REASON)
    sys.path.insert(0, str(comfyui_dir()))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # as main.py --cpu; must precede comfy.model_management
        import comfy.ldm.flux.model  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.ops  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ComfyUI does not import in this Python ({err}); run the host tests with ComfyUI's Python")
    import comfy as module

    return module


@pytest.fixture(scope="module")
def pack(comfy):
    spec = importlib.util.spec_from_file_location("instantcharacter_pack_native", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{spec.name}.nodes.native_patch")


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


@pytest.fixture(scope="module")
def features(tiny_encoders):
    return tiny_encoders.encode([Image.open(ROOT / "assets" / "reference_girl.png")])


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
    from instantcharacter.run.native import CharacterSet

    characters = CharacterSet(tuple(entries))
    patches = {}
    n_double = len(comfy_flux.double_blocks)
    for kind, blocks, offset in (("double", comfy_flux.double_blocks, 0), ("single", comfy_flux.single_blocks, n_double)):
        for i in range(len(blocks)):
            before = (previous or {}).get((f"{kind}_block", i))
            patches[(f"{kind}_block", i)] = pack.CharacterBlockPatch(kind, i, offset + i, characters, before)
    return {"patches_replace": {"dit": patches},
            "wrappers": {"diffusion_model": {"instantcharacter": [pack.diffusion_model_wrapper(characters)]}}}


def _comfy_call(comfy_flux, x, ctx, pooled, sigma, patched, cond_or_uncond=None, **kwargs):
    batch = x.shape[0]
    options = {**patched, "sigmas": torch.full([batch], sigma), "cond_or_uncond": cond_or_uncond or [0]}
    with torch.inference_mode():
        return comfy_flux(x, torch.full([batch], sigma), ctx, y=pooled, guidance=torch.full([batch], 3.5),
                          transformer_options=options, **kwargs)


def _diffusers_call(flux, adapter, features, x, ctx, pooled, sigma, scale):
    from instantcharacter.model.adapter import attach

    t = flux.transformer
    b, _, h, w = x.shape
    ids = torch.zeros(h // 2 * w // 2, 3)
    ids[:, 1], ids[:, 2] = torch.arange(h // 2 * w // 2) // (w // 2), torch.arange(h // 2 * w // 2) % (w // 2)
    with torch.inference_mode(), attach(t, adapter) as att:
        att.context.image_seq_len = ids.shape[0]
        att.context.scale = scale
        att.context.tokens = adapter.image_proj(*features.tensors(), torch.tensor([sigma * 1000.0])) if scale else None
        out = t(hidden_states=_pack(x), timestep=torch.full([b], sigma), guidance=torch.full([b], 3.5),
                pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=torch.zeros(ctx.shape[1], 3),
                img_ids=ids, return_dict=False)[0]
    return _unpack(out, h, w)


def test_one_model_call_matches_the_pipeline_path(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native import CharacterEntry

    x, ctx, pooled = _inputs(tiny_flux)
    entry = CharacterEntry(tiny_adapter, features, 0.9)
    native = _comfy_call(comfy_flux, x, ctx, pooled, 0.7, _patches(pack, comfy_flux, [entry]))
    pipeline = _diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, 0.7, 0.9)
    plain = _diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, 0.7, 0.0)
    diff = (native - pipeline).abs().max().item()
    print(f"\nnative vs pipeline, one model call: max diff {diff:.2e} (character effect {(pipeline - plain).abs().max():.2e})")
    assert diff <= 1e-5
    assert (pipeline - plain).abs().max() > 1e-3  # the character really acts


def test_a_few_euler_steps_match(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native import CharacterEntry

    x0, ctx, pooled = _inputs(tiny_flux, batch=1)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    entry = CharacterEntry(tiny_adapter, features, 0.9)
    patches = _patches(pack, comfy_flux, [entry])
    a = b = x0
    for s, s_next in zip(sigmas, sigmas[1:]):
        a = a + (s_next - s) * _comfy_call(comfy_flux, a, ctx, pooled, s, patches)
        b = b + (s_next - s) * _diffusers_call(tiny_flux, tiny_adapter, features, b, ctx, pooled, s, 0.9)
    diff = (a - b).abs().max().item()
    print(f"\nnative vs pipeline, 4 Euler steps: max diff {diff:.2e}")
    assert diff <= 1e-5


def test_weight_zero_and_outside_the_window_are_exactly_unpatched(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native import CharacterEntry

    x, ctx, pooled = _inputs(tiny_flux)
    plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, {})
    zero = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [CharacterEntry(tiny_adapter, features, 0.0)]))
    late = CharacterEntry(tiny_adapter, features, 0.9, sigma_start=0.5, sigma_end=0.0)  # acts only below 0.5
    outside = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [late]))
    inside = _comfy_call(comfy_flux, x, ctx, pooled, 0.4, _patches(pack, comfy_flux, [late]))
    assert torch.equal(zero, plain) and torch.equal(outside, plain)
    assert (inside - _comfy_call(comfy_flux, x, ctx, pooled, 0.4, {})).abs().max() > 1e-3


def test_negative_pass_can_be_left_alone(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native import CharacterEntry

    x, ctx, pooled = _inputs(tiny_flux)  # batch 2 = [cond, uncond]
    plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, {}, [0, 1])
    entry = CharacterEntry(tiny_adapter, features, 0.9, on_negative=False)
    out = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [entry]), [0, 1])
    assert torch.equal(out[1], plain[1])
    assert (out[0] - plain[0]).abs().max() > 1e-3


def test_two_characters_compose_and_foreign_patches_are_kept(pack, comfy_flux, tiny_flux, tiny_adapter, features):
    from instantcharacter.run.native import CharacterEntry

    x, ctx, pooled = _inputs(tiny_flux)
    a = CharacterEntry(tiny_adapter, features, 0.5)
    one = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [a]))
    both = _comfy_call(comfy_flux, x, ctx, pooled, 0.6, _patches(pack, comfy_flux, [a, CharacterEntry(tiny_adapter, features, 0.4)]))
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

    native = importlib.import_module("instantcharacter_pack_native.nodes.native")

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

    from instantcharacter.run.native import CharacterEntry
    from instantcharacter.files.single_file import load_flux_transformer

    model = _comfy_twin(tiny_flux.transformer, torch.float8_e4m3fn, comfy.ops.manual_cast)
    model.load_state_dict(_comfy_state_dict(tiny_flux.transformer))  # rounds every weight to fp8
    model.eval()
    assert next(model.double_blocks[0].parameters()).dtype == torch.float8_e4m3fn
    rounded = tmp_path / "flux1-dev-fp8-rounded.safetensors"
    save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, str(rounded))
    twin = SimpleNamespace(transformer=load_flux_transformer(rounded, dtype=torch.float32))

    x, ctx, pooled = _inputs(tiny_flux)
    entry = CharacterEntry(tiny_adapter, features, 0.9)
    native = _comfy_call(model, x, ctx, pooled, 0.7, _patches(pack, model, [entry]))
    plain = _comfy_call(model, x, ctx, pooled, 0.7, {})
    pipeline = _diffusers_call(twin, tiny_adapter, features, x, ctx, pooled, 0.7, 0.9)
    diff = (native - pipeline).abs().max().item()
    print(f"\nfp8 MODEL (manual_cast) native vs pipeline on the same rounded weights: max diff {diff:.2e}")
    assert diff <= 1e-5
    assert (native - plain).abs().max() > 1e-3
