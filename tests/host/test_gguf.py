"""InstantCharacter Apply on a FLUX MODEL loaded from a ``.gguf`` file by city96/ComfyUI-GGUF, in-process.

Needs ``COMFYUI_DIR`` (a ComfyUI checkout, its Python), ``COMFYUI_GGUF_DIR`` (a ComfyUI-GGUF checkout; its code
is imported from there, never copied here) and the ``gguf`` package; without them the tests are skipped.

The file is a tiny twin of the test FLUX in the layout of the published FLUX.1-dev GGUF conversions
(:mod:`instantcharacter.testing.gguf`: BFL key names, ``general.architecture`` flux, 1-D tensors F32, in/out
layers BF16/F16, block weights Q8_0, Q6_K, Q5_1 and Q4_0). It is loaded by ComfyUI-GGUF's own "Unet Loader
(GGUF)" node (``UnetLoaderGGUF.load_unet``, the file picked from its own file list): its reader, its
``GGMLTensor`` state dict, ComfyUI's ``load_diffusion_model_state_dict`` with its ``GGMLOps`` as the model's
operations, and its ``GGUFModelPatcher``. The layers then dequantize on the fly in every call, as for users.

One thing is not as for users, on ComfyUI v0.3.64 only: that ComfyUI detects a FLUX file's widths by assumption
(hidden 3072, text 4096, 24 heads) instead of reading them from the file, so a tiny file would become a
full-width model with tiny weights. :func:`_detected_widths_from_the_file` wraps ComfyUI's
``detect_unet_config`` for the load so it takes ``hidden_size`` and ``context_in_dim`` from ``img_in`` /
``txt_in`` and ``num_heads`` as hidden / sum(axes_dim), which is what v0.33's own detection does (there the
wrapper changes nothing, and the test asserts so). Everything after detection is the real path.

The reference is a plain ComfyUI FLUX MODEL (ComfyUI's own ops, no ComfyUI-GGUF) loaded by the same ComfyUI
function from the file's tensors dequantized to float32 in advance, patched by the same Apply node with the same
character: one model call on each must agree (fp32 compute). The dequantized weights are ComfyUI-GGUF's own
dequantization (what its layers compute with); the ``gguf`` package's numpy dequantizers are checked against
them separately.
"""

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from comfyui import SKIP_REASON, comfyui_dir

ROOT = Path(__file__).resolve().parents[2]
GGUF_PACKAGE = "comfyui_gguf_under_test"
FILE_NAME = "flux1-dev-tiny-mixed-quants.gguf"
TOLERANCE = 1e-5


def comfyui_gguf_dir() -> Path | None:
    value = os.environ.get("COMFYUI_GGUF_DIR")
    return Path(value) if value and (Path(value) / "nodes.py").is_file() and (Path(value) / "ops.py").is_file() else None


GGUF_SKIP_REASON = ("COMFYUI_GGUF_DIR is not set to a city96/ComfyUI-GGUF checkout (the folder with its nodes.py, "
                    "ops.py, loader.py); the GGUF host tests import ComfyUI-GGUF from there")


def _gguf_package_missing() -> str | None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        return (f"the gguf package does not import ({err}): pip install gguf (ComfyUI-GGUF's requirement, in "
                "tests/requirements.txt)")
    return None


# decided at collection, so a skipped run builds none of the (session) tiny models first
pytestmark = [pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON),
              pytest.mark.skipif(comfyui_gguf_dir() is None, reason=GGUF_SKIP_REASON),
              pytest.mark.skipif(_gguf_package_missing() is not None, reason=str(_gguf_package_missing()))]


@pytest.fixture(scope="module")
def comfyui_gguf(request):
    """ComfyUI-GGUF imported as ComfyUI imports a custom node: its folder as a package, its ``__init__`` run."""
    if comfyui_dir() is None:
        pytest.skip(SKIP_REASON)
    folder = comfyui_gguf_dir()
    if folder is None:
        pytest.skip(GGUF_SKIP_REASON)
    if _gguf_package_missing():
        pytest.skip(_gguf_package_missing())
    request.getfixturevalue("comfy")
    import folder_paths  # noqa: F401
    import nodes  # ComfyUI's nodes.py, which ComfyUI-GGUF imports (not this pack's nodes/ folder)

    if Path(nodes.__file__).resolve().parent != comfyui_dir().resolve():
        pytest.fail(f"'import nodes' found {nodes.__file__}, not ComfyUI's nodes.py in {comfyui_dir()}")
    if GGUF_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(GGUF_PACKAGE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[GGUF_PACKAGE] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # a ComfyUI-GGUF that does not work with this ComfyUI: say why, do not pass
            for name in [n for n in sys.modules if n == GGUF_PACKAGE or n.startswith(GGUF_PACKAGE + ".")]:
                del sys.modules[name]
            pytest.skip(f"ComfyUI-GGUF ({folder}) does not import with the ComfyUI in {comfyui_dir()}: "
                        f"{type(err).__name__}: {err}")
    module = sys.modules[GGUF_PACKAGE]
    assert "UnetLoaderGGUF" in getattr(module, "NODE_CLASS_MAPPINGS", {}), "ComfyUI-GGUF exported no UnetLoaderGGUF"
    return module


@contextlib.contextmanager
def _detected_widths_from_the_file(comfy):
    """ComfyUI's FLUX detection, with the widths read from the file as ComfyUI v0.33 reads them (see the module
    docstring). Yields the list of what it had to change (empty where ComfyUI already reads them)."""
    import comfy.model_detection as detection

    original = detection.detect_unet_config
    changed = []

    def detect(state_dict, key_prefix, *args, **kwargs):
        config = original(state_dict, key_prefix, *args, **kwargs)
        img_in, txt_in = state_dict.get(f"{key_prefix}img_in.weight"), state_dict.get(f"{key_prefix}txt_in.weight")
        if config and config.get("image_model") == "flux" and img_in is not None and txt_in is not None:
            want = {"hidden_size": int(img_in.shape[0]), "context_in_dim": int(txt_in.shape[1])}
            want["num_heads"] = want["hidden_size"] // sum(config["axes_dim"])
            diff = {k: (config.get(k), v) for k, v in want.items() if config.get(k) != v}
            if diff:
                changed.append(diff)
                config.update(want)
        return config

    detection.detect_unet_config = detect
    try:
        yield changed
    finally:
        detection.detect_unet_config = original


@pytest.fixture(scope="module")
def gguf_file(comfyui_gguf, tiny_flux, tmp_path_factory):
    from instantcharacter.testing.gguf import write_gguf_flux
    from instantcharacter.testing.single_file import bfl_flux_state_dict

    folder = tmp_path_factory.mktemp("diffusion_models")
    return write_gguf_flux(bfl_flux_state_dict(tiny_flux.transformer), folder / FILE_NAME)


@contextlib.contextmanager
def _gguf_loading(comfy, gguf_file):
    """The file in ComfyUI's diffusion_models folders (where ComfyUI-GGUF's loaders list it) and ComfyUI's FLUX
    detection reading the widths from the file, for the loads inside the block."""
    import folder_paths

    folder = str(gguf_file.parent)
    folder_paths.add_model_folder_path("diffusion_models", folder)
    try:
        with _detected_widths_from_the_file(comfy) as changed:
            yield changed
    finally:
        paths = folder_paths.folder_names_and_paths["diffusion_models"][0]
        if folder in paths:
            paths.remove(folder)


def _load_with_node(comfyui_gguf, name, **widgets):
    """A MODEL from one of ComfyUI-GGUF's loader nodes, the file picked from the node's own list."""
    node = comfyui_gguf.NODE_CLASS_MAPPINGS[name]
    offered = node.INPUT_TYPES()["required"]["unet_name"][0]
    assert FILE_NAME in offered, offered  # the node lists the file as it does for a user
    return getattr(node(), node.FUNCTION)(FILE_NAME, **widgets)[0]


@pytest.fixture(scope="module")
def models(comfy, comfyui_gguf, gguf_file):
    """The GGUF MODEL from ComfyUI-GGUF's Unet Loader (GGUF) node, and the plain MODEL of its dequantized weights."""
    import comfy.model_management as mm
    import comfy.sd

    loader_module = importlib.import_module(f"{GGUF_PACKAGE}.loader")
    dequant = importlib.import_module(f"{GGUF_PACKAGE}.dequant")
    with _gguf_loading(comfy, gguf_file) as changed:
        gguf_model = _load_with_node(comfyui_gguf, "UnetLoaderGGUF")
        # what ComfyUI-GGUF's layers compute with: its own dequantization (default dequant_dtype) to float32
        raw = loader_module.gguf_sd_loader(str(gguf_file))
        dequantized = {k: dequant.dequantize_tensor(v, torch.float32).as_subclass(torch.Tensor).float().clone()
                       for k, v in raw.items()}
        plain_model = comfy.sd.load_diffusion_model_state_dict(dict(dequantized))
    assert plain_model is not None
    if changed:
        print(f"\nThis ComfyUI assumes FLUX widths; for the tiny file they were read from it: {changed[0]}")
    else:
        print("\nThis ComfyUI reads the FLUX widths from the file (the detection wrapper changed nothing)")
    yield {"gguf": gguf_model, "plain": plain_model, "dequantized": dequantized, "changed": changed}
    mm.unload_all_models()


def _inputs(tiny_flux, batch=2, side=8, text_len=9):
    g = torch.Generator().manual_seed(4)
    cfg = tiny_flux.transformer.config
    return (torch.randn(batch, 16, side, side, generator=g),
            torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
            torch.randn(batch, cfg.pooled_projection_dim, generator=g))


def _apply(pack, model, adapter, features, weight=0.9):
    apply_node = pack.apply.ApplyToModel
    out = apply_node.execute(model, adapter, features, weight, 0.0, 1.0, True)
    return out.args[0] if hasattr(out, "args") else out[0]


def _call(model, x, ctx, pooled, sigma, cond_or_uncond=(0, 1)):
    """One call of a MODEL's diffusion model with the MODEL's transformer_options and wrappers, as ComfyUI's
    sampler hands them to it (``prepare_model_patcher`` merges the patcher's wrappers into the options)."""
    import comfy.patcher_extension as ext

    batch = x.shape[0]
    options = dict(model.model_options.get("transformer_options", {}))
    options["wrappers"] = ext.copy_nested_dicts(model.wrappers)
    options.update(sigmas=torch.full([batch], sigma), cond_or_uncond=list(cond_or_uncond))
    diffusion = model.get_model_object("diffusion_model")
    dtype = model.model.get_dtype()
    with torch.inference_mode():
        return diffusion(x.to(dtype), torch.full([batch], sigma), ctx.to(dtype), y=pooled.to(dtype),
                         guidance=torch.full([batch], 3.5), transformer_options=options).float()


def _comfyui_version() -> tuple[int, ...]:
    text = (comfyui_dir() / "comfyui_version.py").read_text()
    return tuple(int(n) for n in text.split("__version__ = ")[1].strip().strip("\"'").split(".")[:3])


# How far ComfyUI-GGUF's default dequantization (block arithmetic in fp16, then float32) may be from the exact
# float32 value the gguf package computes, relative to the tensor's largest weight: Q8_0 / Q4_0 (d * q) round
# once, 2^-11 of each weight; Q6_K (d * scale * q) twice; Q5_1 (d * q + m) rounds the product, at most twice the
# largest weight, and the sum: 1.5 * 2^-10. BF16 / F16 / F32 convert exactly.
DEQUANT_BOUNDS = {"Q8_0": 2 ** -11, "Q4_0": 2 ** -11, "Q6_K": 2 ** -10, "Q5_1": 1.5 * 2 ** -10,
                  "BF16": 0.0, "F16": 0.0, "F32": 0.0}


def test_the_gguf_model_is_comfyui_gguf_s_own(comfyui_gguf, models, gguf_file):
    from instantcharacter.testing.gguf import read_dequantized

    ops = importlib.import_module(f"{GGUF_PACKAGE}.ops")
    nodes_module = importlib.import_module(f"{GGUF_PACKAGE}.nodes")
    model = models["gguf"]
    assert isinstance(model, nodes_module.GGUFModelPatcher)
    diffusion = model.get_model_object("diffusion_model")
    assert diffusion.hidden_size == 256 and len(diffusion.double_blocks) == 2 and len(diffusion.single_blocks) == 3
    assert isinstance(diffusion.double_blocks[0].img_attn.qkv, ops.GGMLLayer)
    assert isinstance(diffusion.single_blocks[0].linear2, ops.GGMLLayer)
    if _comfyui_version() >= (0, 33):
        assert not models["changed"]  # this ComfyUI detects the tiny file by itself
    stored = {}
    for _, p in diffusion.named_parameters():
        kind = getattr(getattr(p, "tensor_type", None), "name", "plain")
        stored[kind] = stored.get(kind, 0) + 1
    print(f"\nGGUF MODEL parameters by storage: {stored}")
    assert {"Q8_0", "Q6_K", "Q5_1", "Q4_0", "BF16", "F16", "F32"} <= set(stored)
    # the reference weights are the file's: ComfyUI-GGUF's dequantization against the gguf package's (numpy)
    reference, qtypes = read_dequantized(gguf_file)
    worst = {}
    for key, exact in reference.items():
        relative = (models["dequantized"][key] - exact).abs().max().item() / exact.abs().max().item()
        worst[qtypes[key]] = max(worst.get(qtypes[key], 0.0), relative)
    print("ComfyUI-GGUF's default dequantization vs the gguf package's, max diff / max weight: " +
          ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    for kind, relative in worst.items():
        assert relative <= DEQUANT_BOUNDS[kind], (kind, relative)


def test_apply_on_a_gguf_model_matches_the_dequantized_model(models, pack, tiny_flux, tiny_adapter, features):
    x, ctx, pooled = _inputs(tiny_flux)
    gguf_model, plain_model = models["gguf"], models["plain"]
    assert gguf_model.model.get_dtype() == torch.float32 == plain_model.model.get_dtype()
    patched_gguf = _apply(pack, gguf_model, tiny_adapter, features)
    patched_plain = _apply(pack, plain_model, tiny_adapter, features)
    assert not gguf_model.model_options.get("transformer_options", {}).get("patches_replace")  # the input unchanged
    sigma = 0.7
    ours = _call(patched_gguf, x, ctx, pooled, sigma)
    reference = _call(patched_plain, x, ctx, pooled, sigma)
    unpatched = _call(gguf_model, x, ctx, pooled, sigma)
    effect = (ours - unpatched).abs().max().item()
    diff = (ours - reference).abs().max().item()
    plain_diff = (unpatched - _call(plain_model, x, ctx, pooled, sigma)).abs().max().item()
    print(f"\nGGUF MODEL + Apply vs dequantized MODEL + Apply, one model call: max diff {diff:.2e} "
          f"(without Apply: {plain_diff:.2e}; character effect {effect:.2e}; output scale {reference.abs().max():.2e})")
    assert torch.isfinite(ours).all()
    assert diff <= TOLERANCE
    assert effect > 1e-3  # the character really acts on the GGUF model
    zero = _call(_apply(pack, gguf_model, tiny_adapter, features, weight=0.0), x, ctx, pooled, sigma)
    assert torch.equal(zero, unpatched)  # weight 0: exactly the unpatched GGUF model


def test_the_stock_sampler_on_the_gguf_model_matches(models, pack, comfy, tiny_flux, tiny_adapter, features):
    """Two Euler steps with CFG through ComfyUI's own sampler (``comfy.sample.sample``: ComfyUI's model loading,
    the GGUF patcher's load, the adapter as an additional model, the OUTER_SAMPLE wrapper, the negative pass)."""
    import comfy.model_management as mm
    import comfy.sample

    g = torch.Generator().manual_seed(7)
    cfg = tiny_flux.transformer.config
    positive = [[torch.randn(1, 9, cfg.joint_attention_dim, generator=g),
                 {"pooled_output": torch.randn(1, cfg.pooled_projection_dim, generator=g), "guidance": 3.5}]]
    negative = [[torch.randn(1, 9, cfg.joint_attention_dim, generator=g),
                 {"pooled_output": torch.randn(1, cfg.pooled_projection_dim, generator=g), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(1, 16, 16, 16, generator=g)

    def sample(model):
        out = comfy.sample.sample(model, noise.clone(), 2, 2.0, "euler", "simple", positive, negative, latent.clone(),
                                  disable_pbar=True, seed=7)
        return out.float()

    try:
        ours = sample(_apply(pack, models["gguf"], tiny_adapter, features))
        reference = sample(_apply(pack, models["plain"], tiny_adapter, features))
        unpatched = sample(models["gguf"])
    finally:
        mm.unload_all_models()
    diff = (ours - reference).abs().max().item()
    effect = (ours - unpatched).abs().max().item()
    print(f"\nKSampler (2 Euler steps, CFG 2) on the GGUF MODEL vs the dequantized MODEL: max diff {diff:.2e} "
          f"(character effect {effect:.2e})")
    assert torch.isfinite(ours).all()
    assert diff <= TOLERANCE
    assert effect > 1e-3


def test_the_advanced_loader_in_float32_matches_the_gguf_package_s_dequantization(
        comfyui_gguf, models, gguf_file, pack, comfy, tiny_flux, tiny_adapter, features):
    """Unet Loader (GGUF/Advanced) with dequant_dtype float32 dequantizes in float32: then the GGUF MODEL with the
    character matches a plain MODEL of the weights the ``gguf`` package dequantizes (an independent
    implementation), not only ComfyUI-GGUF's own."""
    import comfy.model_management as mm
    import comfy.sd

    from instantcharacter.testing.gguf import read_dequantized

    ops = importlib.import_module(f"{GGUF_PACKAGE}.ops")
    before = ops.GGMLOps.Linear.dequant_dtype, ops.GGMLOps.Linear.patch_dtype
    x, ctx, pooled = _inputs(tiny_flux)
    try:
        with _gguf_loading(comfy, gguf_file):
            # ComfyUI-GGUF keeps these settings on its shared Linear class: they hold for every GGUF MODEL
            advanced = _load_with_node(comfyui_gguf, "UnetLoaderGGUFAdvanced", dequant_dtype="float32",
                                       patch_dtype="default", patch_on_device=False)
            exact, _ = read_dequantized(gguf_file)
            plain = comfy.sd.load_diffusion_model_state_dict(exact)
        ours = _call(_apply(pack, advanced, tiny_adapter, features), x, ctx, pooled, 0.7)
        reference = _call(_apply(pack, plain, tiny_adapter, features), x, ctx, pooled, 0.7)
        effect = (ours - _call(advanced, x, ctx, pooled, 0.7)).abs().max().item()
    finally:
        ops.GGMLOps.Linear.dequant_dtype, ops.GGMLOps.Linear.patch_dtype = before
        mm.unload_all_models()
    diff = (ours - reference).abs().max().item()
    print(f"\nGGUF MODEL (Advanced loader, dequant float32) + Apply vs the gguf package's dequantized weights + "
          f"Apply, one model call: max diff {diff:.2e} (character effect {effect:.2e})")
    assert diff <= TOLERANCE
    assert effect > 1e-3
