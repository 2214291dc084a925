"""Style LoRAs on the pipeline path: every file format, exact round trip, stacking, offload modes, bad files."""

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

from instantcharacter.errors import InputError, LoraFileError
from instantcharacter.files.lora_file import clear_cache, read_lora
from instantcharacter.run.style_loras import StyledFlux, StyleLoras
from instantcharacter.testing.tiny_loras import LORA_FORMATS, diffusers_deltas, tiny_lora_layers, write_tiny_lora
from generation import run as run_generation


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    files = {fmt: write_tiny_lora(root / f"{fmt}.safetensors", fmt) for fmt in LORA_FORMATS}
    files["second"] = write_tiny_lora(root / "second.safetensors", "diffusers", seed=1)
    files["pickled"] = write_tiny_lora(root / "pickled.pt", "comfyui", seed=2)
    return files


def _inputs():
    g = torch.Generator().manual_seed(1)
    tokens, text = 16, 8
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                return_dict=False)


def _forward(transformer):
    with torch.inference_mode():
        return transformer(**_inputs())[0]


def _merged_forward(transformer, *loras):
    """The output the LoRAs should give: their weight changes merged into a copy of the transformer."""
    merged = copy.deepcopy(transformer)
    with torch.no_grad():
        for layers, strength in loras:
            for name, delta in diffusers_deltas(layers, strength).items():
                merged.get_submodule(name).weight += delta
    return _forward(merged)


def _snapshot(transformer):
    return {
        "modules": [(name, type(m)) for name, m in transformer.named_modules()],
        "state": {k: (v.data_ptr(), v.clone()) for k, v in transformer.state_dict().items()},
        "grad": [p.requires_grad for p in transformer.parameters()],
        "attrs": set(vars(transformer)),
    }


def _assert_restored(transformer, snapshot):
    """Same module tree, same state_dict keys, every tensor the same storage and bits, nothing left behind."""
    now = _snapshot(transformer)
    assert now["modules"] == snapshot["modules"]
    assert now["state"].keys() == snapshot["state"].keys()
    for key, (ptr, value) in snapshot["state"].items():
        assert now["state"][key][0] == ptr and torch.equal(now["state"][key][1], value), key
    assert now["grad"] == snapshot["grad"]
    assert now["attrs"] == snapshot["attrs"]
    assert not hasattr(transformer, "peft_config")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in transformer.modules())


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_format_applies_like_merging_and_removes_exactly(tiny_flux, lora_files, fmt):
    t = tiny_flux.transformer
    before = _snapshot(t)
    base = _forward(t)
    with StyleLoras(t, [(lora_files[fmt], 1.0)]):
        styled = _forward(t)
    assert (styled - base).abs().max() > 0.1
    torch.testing.assert_close(styled, _merged_forward(t, (tiny_lora_layers(fmt=fmt), 1.0)), rtol=1e-5, atol=2e-5)
    _assert_restored(t, before)
    assert torch.equal(_forward(t), base)


def test_text_encoder_parts_are_skipped_and_pickles_read(tiny_flux, lora_files):
    assert read_lora(lora_files["kohya"]).skipped == 2
    assert read_lora(lora_files["diffusers"]).skipped == 2
    t = tiny_flux.transformer
    with StyleLoras(t, [(lora_files["pickled"], 1.0)]):
        styled = _forward(t)
    torch.testing.assert_close(styled, _merged_forward(t, (tiny_lora_layers(seed=2), 1.0)), rtol=1e-5, atol=2e-5)


def test_diffusers_metadata_sets_the_scale(tiny_flux, lora_files, tmp_path):
    """diffusers-trained files keep rank and alpha in the safetensors header (lora_alpha / r = 0.5 here)."""
    import json

    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(lora_files["diffusers"]).items() if k.startswith("transformer.")}
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors})
    metadata = {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.target_modules": targets}
    path = tmp_path / "with_metadata.safetensors"
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(metadata)})
    t = tiny_flux.transformer
    with StyleLoras(t, [(path, 1.0)]):
        styled = _forward(t)
    torch.testing.assert_close(styled, _merged_forward(t, (tiny_lora_layers(fmt="diffusers"), 0.5)),
                               rtol=1e-5, atol=2e-5)


def test_lora_weights_take_their_layers_dtype(tiny_flux, lora_files, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(lora_files["comfyui"]).items()}, path)
    t = tiny_flux.transformer
    with StyleLoras(t, [(path, 1.0)]) as styles:
        layer = t.transformer_blocks[0].attn.to_q
        assert layer.lora_A[styles.adapter_names[0]].weight.dtype == layer.base_layer.weight.dtype == torch.float32


def test_strength_scales_and_zero_is_off(tiny_flux, lora_files):
    t = tiny_flux.transformer
    base = _forward(t)
    layers = tiny_lora_layers(fmt="comfyui")
    with StyleLoras(t, [(lora_files["comfyui"], -0.5)]):
        half = _forward(t)
    torch.testing.assert_close(half, _merged_forward(t, (layers, -0.5)), rtol=1e-5, atol=2e-5)
    off = StyleLoras(t, [(lora_files["comfyui"], 0.0)])
    with off:
        assert not hasattr(t, "peft_config")
        assert torch.equal(_forward(t), base)


def test_two_loras_stack(tiny_flux, lora_files):
    t = tiny_flux.transformer
    before = _snapshot(t)
    first, second = (lora_files["kohya"], 0.8), (lora_files["second"], 0.6)
    outputs = {}
    for name, loras in {"first": [first], "second": [second], "both": [first, second]}.items():
        with StyleLoras(t, loras):
            outputs[name] = _forward(t)
    expected = _merged_forward(t, (tiny_lora_layers(fmt="kohya"), 0.8), (tiny_lora_layers(seed=1), 0.6))
    torch.testing.assert_close(outputs["both"], expected, rtol=1e-5, atol=2e-5)
    assert (outputs["both"] - outputs["first"]).abs().max() > 0.05
    assert (outputs["both"] - outputs["second"]).abs().max() > 0.05
    _assert_restored(t, before)


def test_cache_reads_a_file_once_until_it_changes(lora_files, tmp_path):
    clear_cache()
    path = write_tiny_lora(tmp_path / "cached.safetensors", "diffusers")
    first = read_lora(path)
    assert read_lora(path) is first
    stat = path.stat()
    write_tiny_lora(path, "diffusers", seed=5)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = read_lora(path)
    assert changed is not first and read_lora(path) is changed


def _generate(flux, adapter=None, features=None, **kw):
    return run_generation(flux, adapter, features, "a girl", width=64, height=64, steps=2, seed=3,
                    max_sequence_length=32, decode=False, **kw).latents


def _streaming_budget(flux):
    """A VRAM budget (GiB), from the tiny transformer's block sizes, that keeps some blocks resident and streams
    the rest."""
    from instantcharacter.run.offload.placement import Placement
    from instantcharacter.run.offload.planner import partial_budgets

    budget, resident = partial_budgets(flux.transformer, None)[0]
    placement = Placement(flux, None, "budget", "cpu", budget_gb=budget)
    assert placement.denoising_plan().resident == resident and 0 < sum(resident) < len(resident)
    placement.restore()
    return budget


@pytest.fixture(scope="module")
def modes(tiny_flux):
    return {"off": {"offload": "off"},
            "budget": {"offload": "budget", "vram_budget_gb": _streaming_budget(tiny_flux)},
            "sequential": {"offload": "sequential"}}


def test_generate_with_lora_is_the_same_in_every_offload_mode(tiny_flux, lora_files, modes):
    t = tiny_flux.transformer
    _generate(tiny_flux, **modes["budget"])  # the first streamed run moves the weights into flat host buffers
    before = _snapshot(t)  # ... where every later run, with or without LoRAs, leaves them
    loras = [(lora_files["kohya"], 1.0), (lora_files["second"], 0.5)]
    plain = _generate(tiny_flux, offload="off")
    results = {}
    for mode, settings in modes.items():
        results[mode] = _generate(tiny_flux, loras=loras, **settings)
        _assert_restored(t, before)
    assert not torch.equal(results["off"], plain)
    assert torch.equal(results["budget"], results["off"])
    assert torch.equal(results["sequential"], results["off"])
    for mode, settings in modes.items():
        fp8 = _generate(tiny_flux, loras=loras, fp8_storage=True, **settings)
        _assert_restored(t, before)
        assert (fp8 - results["off"]).norm() / results["off"].norm() < 0.1, mode
        assert (fp8 - plain).norm() > 10 * (fp8 - results["off"]).norm(), mode  # the LoRA still acts under fp8
    assert torch.equal(_generate(tiny_flux, offload="off"), plain)


def test_flux_with_loras_stacks_without_changing_the_input(tiny_flux, lora_files):
    bare = StyledFlux.of(tiny_flux)
    one = bare.with_lora(lora_files["kohya"], 1.0)
    two = one.with_lora(lora_files["second"], 0.5)
    assert isinstance(two, StyledFlux) and two.pipeline is tiny_flux and StyledFlux.of(two) is two
    assert bare.loras == () and [s.strength for s in one.loras] == [1.0]
    assert [s.strength for s in two.loras] == [1.0, 0.5]
    assert not hasattr(tiny_flux, "loras")
    explicit = _generate(tiny_flux, offload="off", loras=[(lora_files["kohya"], 1.0), (lora_files["second"], 0.5)])
    assert torch.equal(_generate(two, offload="off"), explicit)


def test_generate_with_character_and_lora(tiny_flux, tiny_adapter, tiny_encoders, lora_files, modes):
    from pathlib import Path

    from PIL import Image

    image = Image.open(Path(__file__).resolve().parents[1] / "assets" / "reference_girl.png")
    features = tiny_encoders.encode([image])
    flux = StyledFlux.of(tiny_flux).with_lora(lora_files["bfl"], 1.0)
    before = _snapshot(tiny_flux.transformer)
    processors = dict(tiny_flux.transformer.attn_processors)
    off = _generate(flux, tiny_adapter, features, offload="off")
    streamed = _generate(flux, tiny_adapter, features, **modes["budget"])
    assert torch.equal(off, streamed)
    assert not torch.equal(off, _generate(tiny_flux, tiny_adapter, features, offload="off"))
    _assert_restored(tiny_flux.transformer, before)
    assert tiny_flux.transformer.attn_processors == processors


@pytest.mark.parametrize("mode", ["off", "budget"])
def test_cancelled_run_leaves_the_model_clean(tiny_flux, lora_files, modes, mode):
    t = tiny_flux.transformer
    before = _snapshot(t)

    def cancel(step, total, denoised):
        assert hasattr(t, "peft_config")  # the LoRA is in while the steps run
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _generate(tiny_flux, loras=[(lora_files["xlabs"], 1.0)], on_step=cancel, **modes[mode])
    _assert_restored(t, before)


def _bad(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("name, tensors, message", [
    ("sd15", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
     "Stable Diffusion 1.5/SDXL LoRA"),
    ("sdxl", {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 640),
              "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(640, 4)},
     "Stable Diffusion 1.5/SDXL LoRA"),
    ("full", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(768, 256), "img_in.weight": torch.zeros(256, 64)},
     "full FLUX model, not a LoRA"),
    ("control", {"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 128),
                 "diffusion_model.img_in.lora_B.weight": torch.zeros(256, 4)}, "FLUX Control/Fill LoRA"),
    ("wider", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)},
     "takes 256 input features"),
    ("lokr", {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.zeros(4, 4),
              "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.zeros(192, 64)}, "LyCORIS"),
])
def test_unsupported_files_get_a_clear_error(tiny_flux, tmp_path, name, tensors, message):
    path = _bad(tmp_path, name, tensors)
    before = _snapshot(tiny_flux.transformer)
    with pytest.raises(LoraFileError, match=message) as info:
        _generate(tiny_flux, loras=[(path, 1.0)], offload="off")
    assert path.name in str(info.value)
    with pytest.raises(LoraFileError, match=message):
        StyledFlux.of(tiny_flux).with_lora(path, 1.0)
    _assert_restored(tiny_flux.transformer, before)


def test_damaged_and_missing_files(tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    with pytest.raises(LoraFileError, match="damaged.safetensors could not be read"):
        read_lora(damaged)
    with pytest.raises(LoraFileError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")


def test_kohya_fused_single_block_layer_at_flux_width(tmp_path):
    """linear1 (q, k, v and the MLP input in one matrix) splits at the real FLUX.1 widths."""
    path = _bad(tmp_path, "linear1", {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 3072),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(3 * 3072 + 12288, 2),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0)})
    shapes = {k.removeprefix("transformer.single_transformer_blocks.0."): tuple(v.shape)
              for k, v in read_lora(path).tensors.items()}
    assert shapes == {"attn.to_q.lora_A.weight": (2, 3072), "attn.to_k.lora_A.weight": (2, 3072),
                      "attn.to_v.lora_A.weight": (2, 3072), "proj_mlp.lora_A.weight": (2, 3072),
                      "attn.to_q.lora_B.weight": (3072, 2), "attn.to_k.lora_B.weight": (3072, 2),
                      "attn.to_v.lora_B.weight": (3072, 2), "proj_mlp.lora_B.weight": (12288, 2)}


def test_foreign_adapters_are_refused(tiny_flux, lora_files):
    t = tiny_flux.transformer
    before = _snapshot(t)
    t.load_lora_adapter(dict(read_lora(lora_files["diffusers"]).tensors), prefix="transformer",
                        adapter_name="someone_else")
    try:
        styles = StyleLoras(t, [(lora_files["comfyui"], 1.0)])
        with pytest.raises(InputError, match="someone_else"):
            styles.apply()
    finally:
        t.unload_lora()
        t.__dict__.pop("_hf_peft_config_loaded", None)
        for p, requires_grad in zip(t.parameters(), before["grad"]):
            p.requires_grad_(requires_grad)
    _assert_restored(t, before)


def test_lora_layers_travel_with_their_blocks(tiny_flux, lora_files, modes):
    """Applied before the streamer is built, the LoRA weights are streamed (and stored) with their block's."""
    from instantcharacter.run.offload.placement import Placement

    t = tiny_flux.transformer
    _generate(tiny_flux, **modes["budget"])  # the first streamed run moves the weights into flat host buffers
    before = _snapshot(t)
    styles = StyleLoras(t, [(lora_files["comfyui"], 1.0)])
    styles.apply()
    try:
        placement = Placement(tiny_flux, None, "budget", "cpu", budget_gb=modes["budget"]["vram_budget_gb"])
        with placement.denoising():
            blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
            for block, group in zip(blocks, placement.streamer.groups, strict=True):
                lora = {id(p) for name, p in block.named_parameters() if ".lora_" in name}
                # the LoRA branches are one part of the group, in their own dtype (no fp8), made for this run
                assert lora and lora == {id(p) for p in group.parts[-1].params} and group.parts[-1].per_run
        placement.restore()
    finally:
        styles.remove()
    _assert_restored(t, before)


def test_fp8_storage_keeps_lora_weights_exact(tiny_flux, lora_files, modes):
    t = tiny_flux.transformer
    seen = []

    def look(step, total, denoised):
        seen.append(t.transformer_blocks[0].attn.to_q.lora_B["instantcharacter_style_0"].weight.dtype)

    _generate(tiny_flux, loras=[(lora_files["comfyui"], 1.0)], fp8_storage=True, on_step=look,
              **modes["budget"])
    assert seen and all(dtype == t.dtype for dtype in seen)
