"""The native path together with ComfyUI's own LoRA loader, EasyCache and TorchCompileModel, in-process, on a
tiny FLUX MODEL made by ComfyUI's own classes (comfy.supported_models.Flux → comfy.model_base.Flux →
ModelPatcher), CPU, fp32. Runs on every ComfyUI generation we test (v0.3.64 and v0.33.0).

The MODEL is what UNETLoader makes. On v0.33 it is made by UNETLoader's own function
(comfy.sd.load_diffusion_model_state_dict), whose FLUX detection reads the widths from the weights. v0.3.64's
detection (comfy.model_detection) hard-codes hidden_size 3072, 24 heads and a 4096-wide text input, so a tiny
FLUX cannot go through UNETLoader there; the same steps are taken by hand: ComfyUI's FLUX model config with
the tiny sizes, its get_model (a comfy.model_base.Flux holding that config: ComfyUI's LoRA key mapping,
comfy.lora.model_lora_keys_unet, maps FLUX keys only for such a model), the BFL state dict through
load_model_weights (and so through the config's process_unet_state_dict), and a ModelPatcher around it.
"""
import logging
import re

import torch

from test_native import _apply, _diffusers_call, _inputs

CPU = torch.device("cpu")


def _flux_unet_config(transformer):
    """The unet_config ComfyUI's model detection would give the tiny FLUX (if its widths were not fixed)."""
    from comfy.ldm.flux.model import FluxParams

    cfg = transformer.config
    config = dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, patch_size=2,
                  vec_in_dim=cfg.pooled_projection_dim, context_in_dim=cfg.joint_attention_dim,
                  hidden_size=transformer.inner_dim, mlp_ratio=4.0, num_heads=cfg.num_attention_heads,
                  depth=cfg.num_layers, depth_single_blocks=cfg.num_single_layers, axes_dim=list(cfg.axes_dims_rope),
                  theta=10000, qkv_bias=True, txt_ids_dims=[])  # txt_ids_dims: v0.33 only
    fields = FluxParams.__dataclass_fields__
    return {k: v for k, v in config.items() if k in ("image_model", "guidance_embed") or k in fields}


def _comfy_model(comfy, tiny_flux):
    """A MODEL as UNETLoader makes it, at the tiny sizes (see the module docstring), CPU, fp32; its weights
    checked against the tiny diffusers transformer's."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    from instantcharacter.testing.single_file import bfl_flux_state_dict

    transformer = tiny_flux.transformer
    sd = bfl_flux_state_dict(transformer)
    wanted = _flux_unet_config(transformer)
    detected = comfy.model_detection.model_config_from_unet(dict(sd), "")
    if detected is not None and detected.unet_config.get("hidden_size") == transformer.inner_dim:  # v0.33
        assert {k: detected.unet_config.get(k) for k in wanted} == wanted
        model = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
        config = model.model.model_config
    else:  # v0.3.64: detection gives FLUX.1's fixed widths
        config = comfy.supported_models.Flux(wanted)
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({}, "", device=CPU)
        base.load_model_weights(dict(sd), "")
        model = comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)
    assert isinstance(model.model, comfy.model_base.Flux) and model.load_device == CPU
    expected = config.process_unet_state_dict(dict(sd))
    loaded = model.model.diffusion_model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], expected[k].float()) for k in expected)
    model.model.eval()
    return model


def _model_call(patched, x, ctx, pooled, sigma, cond_or_uncond=(0,)):
    """One call of the MODEL's diffusion model with the transformer_options a sampler gives it (the model's own
    options, its wrappers, the sigmas), as _comfy_call does for a bare model."""
    import comfy.patcher_extension

    batch = x.shape[0]
    options = comfy.patcher_extension.copy_nested_dicts(patched.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
    options.update(sigmas=torch.full([batch], sigma), cond_or_uncond=list(cond_or_uncond))
    diffusion = patched.model.diffusion_model
    with torch.inference_mode():
        return diffusion(x, torch.full([batch], sigma), ctx, y=pooled, guidance=torch.full([batch], 3.5),
                         transformer_options=options)


def _node_output(out):
    return out.args[0] if hasattr(out, "args") else out[0]


def _transformer_snapshot(transformer):
    return {
        "modules": [(name, type(m)) for name, m in transformer.named_modules()],
        "state": {k: (v.data_ptr(), v.clone()) for k, v in transformer.state_dict().items()},
    }


def _assert_transformer_restored(transformer, snapshot):
    now = _transformer_snapshot(transformer)
    assert now["modules"] == snapshot["modules"]
    assert now["state"].keys() == snapshot["state"].keys()
    for key, (ptr, value) in snapshot["state"].items():
        assert now["state"][key][0] == ptr and torch.equal(now["state"][key][1], value), key
    assert not hasattr(transformer, "peft_config")


# --- 1. ComfyUI's LoRA loader before Apply = the pipeline path with the same LoRA ------------------------------

def test_comfyui_lora_before_apply_matches_the_pipeline_path_with_the_lora(
        comfy, pack, tiny_flux, tiny_adapter, features, tmp_path, caplog):
    """A kohya-format FLUX LoRA applied as LoraLoaderModelOnly applies it (comfy.sd.load_lora_for_models with a
    clip strength of 0), then Apply; ComfyUI puts the LoRA into the weights when it loads the MODEL
    (load_models_gpu) and takes it out on unload. One model call at sigma 0.7 gives what the pipeline path gives
    with the same file as a style LoRA (StyleLoras: PEFT branches beside the layers) and the same character.
    Also checked: every FLUX layer of the file is mapped, the LoRA changes the result, and both sides are
    restored afterwards (ComfyUI's weights, the diffusers transformer's modules and tensors)."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from instantcharacter.run.style_loras import StyleLoras
    from instantcharacter.testing.tiny_loras import tiny_lora_layers, write_tiny_lora

    path = write_tiny_lora(tmp_path / "style_kohya.safetensors", "kohya")
    model = _comfy_model(comfy, tiny_flux)
    diffusion = model.model.diffusion_model
    original = {k: v.clone() for k, v in diffusion.state_dict().items()}

    # LoraLoaderModelOnly: load_lora_for_models(model, None, lora, strength, 0)
    with caplog.at_level(logging.WARNING):
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert all("lora_te1_" in m for m in not_loaded), not_loaded  # only the text-encoder part is left out
    assert len(lora_model.patches) == len(tiny_lora_layers(fmt="kohya"))  # every FLUX layer of the file mapped
    patched = _apply(lora_model, tiny_adapter, features, 0.9)

    x, ctx, pooled = _inputs(tiny_flux)
    sigma = 0.7
    plain_native = _model_call(_apply(model, tiny_adapter, features, 0.9), x, ctx, pooled, sigma)
    with torch.inference_mode():
        mm.load_models_gpu([patched] + patched.get_nested_additional_models())  # the LoRA goes into the weights
    try:
        qkv = diffusion.double_blocks[0].img_attn.qkv.weight
        assert not torch.equal(qkv, original["double_blocks.0.img_attn.qkv.weight"])
        native = _model_call(patched, x, ctx, pooled, sigma)
    finally:
        mm.unload_all_models()
    # ComfyUI restored its weights
    assert all(torch.equal(v, original[k]) for k, v in diffusion.state_dict().items())

    t = tiny_flux.transformer
    before = _transformer_snapshot(t)
    plain_pipeline = _diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, sigma, 0.9)
    with StyleLoras(t, [(path, 1.0)]):
        pipeline = _diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, sigma, 0.9)
    _assert_transformer_restored(t, before)
    assert torch.equal(_diffusers_call(tiny_flux, tiny_adapter, features, x, ctx, pooled, sigma, 0.9), plain_pipeline)

    diff = (native - pipeline).abs().max().item()
    base_diff = (plain_native - plain_pipeline).abs().max().item()
    effect = (pipeline - plain_pipeline).abs().max().item()
    print(f"\nComfyUI LoRA + Apply vs pipeline LoRA + character: max diff {diff:.2e} (without the LoRA "
          f"{base_diff:.2e}; LoRA effect {effect:.2e}, on the native side {(native - plain_native).abs().max():.2e})")
    assert diff <= 1e-5
    assert effect > 1e-3 and (native - plain_native).abs().max() > 1e-3


# --- 2. ComfyUI's EasyCache on a MODEL patched by Apply ---------------------------------------------------------

def _conditioning(tiny_flux, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_flux.transformer.config
    return [[torch.randn(1, 9, cfg.joint_attention_dim, generator=g),
             {"pooled_output": torch.randn(1, cfg.pooled_projection_dim, generator=g), "guidance": 3.5}]]


def _sample(model, tiny_flux, steps=8, cfg=2.0, side=8, callback=None):
    """A KSampler run as nodes.common_ksampler makes it (euler, simple schedule, full denoise), under
    inference mode as ComfyUI executes a prompt."""
    import comfy.model_management as mm
    import comfy.sample

    latent = torch.zeros(1, 16, side, side)
    noise = comfy.sample.prepare_noise(latent, 7)
    try:
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", _conditioning(tiny_flux, 1),
                                       _conditioning(tiny_flux, 2), latent, denoise=1.0, callback=callback,
                                       disable_pbar=True, seed=7)
    finally:
        mm.unload_all_models()


class _Counts:
    """How many model calls ran the FLUX blocks (a pre-hook on the first double block, which every computed
    call runs once) and how many layer attentions the character computed (CharacterCall.delta, once per layer
    and call in which it acts)."""

    def __init__(self, patched):
        import importlib

        self.call_class = importlib.import_module("instantcharacter_pack_native.instantcharacter.run.native_characters").CharacterCall
        self.block_runs = self.layer_deltas = 0
        delta = self.call_class.delta

        def counting(call, *args, **kwargs):
            self.layer_deltas += 1
            return delta(call, *args, **kwargs)

        self.original = delta
        self.call_class.delta = counting

        def ran(module, args):
            self.block_runs += 1

        self.handle = patched.model.diffusion_model.double_blocks[0].register_forward_pre_hook(ran)

    def take(self):
        counts = self.block_runs, self.layer_deltas
        self.block_runs = self.layer_deltas = 0
        return counts

    def close(self):
        self.handle.remove()
        self.call_class.delta = self.original


def _skipped(caplog):
    found = [re.search(r"EasyCache - skipped (\d+)/(\d+) steps", r.getMessage()) for r in caplog.records]
    found = [m for m in found if m]
    assert found, "EasyCache logged no summary: its OUTER_SAMPLE wrapper did not run"
    return int(found[-1].group(1)), int(found[-1].group(2))


def test_easycache_on_a_patched_model_samples_with_the_character(comfy, pack, tiny_flux, tiny_adapter, features,
                                                                  caplog):
    """EasyCache (comfy_extras.nodes_easycache: OUTER_SAMPLE, CALC_COND_BATCH and DIFFUSION_MODEL wrappers)
    after Apply, in real 8-step euler runs (comfy.sample.sample, CFG 2: a positive and a negative pass).

    With a reuse threshold of 0 it skips nothing and the result is bit-identical to Apply alone. With a
    threshold that makes it skip steps the run works and is finite, the character acts in every model call
    EasyCache lets through (all layers) and in no skipped one, it still changes the result against the same
    EasyCache on the unpatched MODEL, and the per-call state is cleared after the run."""
    import comfy_extras.nodes_easycache as easycache

    steps = 8
    layers = len(tiny_flux.transformer.transformer_blocks) + len(tiny_flux.transformer.single_transformer_blocks)
    model = _comfy_model(comfy, tiny_flux)
    patched = _apply(model, tiny_adapter, features, 0.9)
    counts = _Counts(patched)
    try:
        plain = _sample(model, tiny_flux, steps)
        counts.take()
        applied = _sample(patched, tiny_flux, steps)
        full_runs, full_deltas = counts.take()
        assert full_runs >= steps and full_deltas == full_runs * layers
        assert (applied - plain).abs().max() > 1e-3

        never = _node_output(easycache.EasyCacheNode.execute(patched, 0.0, 0.0, 1.0, False))
        with caplog.at_level(logging.INFO):
            assert torch.equal(_sample(never, tiny_flux, steps), applied)
        assert _skipped(caplog) == (0, steps)
        assert counts.take() == (full_runs, full_deltas)

        caplog.clear()
        cached = _node_output(easycache.EasyCacheNode.execute(patched, 0.3, 0.15, 0.95, False))
        with caplog.at_level(logging.INFO):
            out = _sample(cached, tiny_flux, steps)
        skipped, total = _skipped(caplog)
        runs, deltas = counts.take()
        cached_plain = _sample(_node_output(easycache.EasyCacheNode.execute(model, 0.3, 0.15, 0.95, False)),
                               tiny_flux, steps)
    finally:
        counts.close()
    effect = (out - cached_plain).abs().max().item()
    print(f"\nEasyCache on the patched MODEL: skipped {skipped}/{total} steps; the blocks ran in {runs} model calls "
          f"(uncached: {full_runs}), the character acted in {deltas / layers:g} of them; character effect "
          f"{effect:.2e} against EasyCache on the unpatched MODEL; diff to the uncached run "
          f"{(out - applied).abs().max():.2e}")
    assert total == steps and skipped > 0
    assert torch.isfinite(out).all()
    assert runs * steps == full_runs * (steps - skipped)  # the skipped steps ran no block
    assert deltas == runs * layers  # the character acted in every call that ran, at every layer
    assert effect > 1e-3
    # nothing of the runs is left behind: no call state in this thread, no run state in the MODEL's options
    wrappers = pack.model_wrappers
    assert wrappers.CURRENT_CALL.get() is None and wrappers.RUN_KEY not in patched.model_options["transformer_options"]


# --- 3. ComfyUI's TorchCompileModel on a patched MODEL -------------------------------------------------------

COUNTING_BACKEND = "instantcharacter_counting_eager"
_backend_graphs = [0]


def _counting_eager(gm, example_inputs):
    _backend_graphs[0] += 1
    return gm.forward


def _dynamo_counts():
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()), "backend_graphs": _backend_graphs[0]}


def _compiled_run(model, tiny_flux, steps):
    """TorchCompileModel's execute on ``model``, then a sampling run from a clean dynamo; the dynamo counts
    after each step."""
    import torch._dynamo
    from torch._dynamo.backends.registry import list_backends, register_backend
    from torch._dynamo.utils import counters

    import comfy_extras.nodes_torch_compile as torch_compile

    if COUNTING_BACKEND not in list_backends(exclude_tags=()):
        register_backend(_counting_eager, name=COUNTING_BACKEND)
    torch._dynamo.reset()
    counters.clear()
    _backend_graphs[0] = 0
    compiled = _node_output(torch_compile.TorchCompileModel.execute(model, COUNTING_BACKEND))
    history = []
    try:
        out = _sample(compiled, tiny_flux, steps, callback=lambda *a: history.append(_dynamo_counts()))
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert len(history) == steps
    assert history[0]["backend_graphs"] > 0 and history[0]["frames"] > 0  # dynamo really compiled the model
    return out, history, breaks


def _per_step(history, key):
    return [h[key] for h in history]


def test_torch_compile_model_compiles_once_not_per_step(comfy, pack, tiny_flux, tiny_adapter, features,
                                                         monkeypatch, caplog):
    """TorchCompileModel (comfy_extras.nodes_torch_compile) on a MODEL patched by Apply, in a real 6-step run
    (comfy.sample.sample, CFG 2).

    The node offers "inductor" and "cudagraphs" and hands the name to torch.compile through ComfyUI's
    set_torch_compile_wrapper (an APPLY_MODEL wrapper that calls the compiled diffusion model). Here the node's
    own execute gets a backend registered with dynamo that counts the graphs it is given and runs them eagerly:
    what dynamo does (tracing the blocks, our patches and hooks, guards, recompiles, graph breaks) does not
    depend on the backend, and inductor's C++ code generation for dozens of graphs would take minutes on a CPU.

    ComfyUI picks its attention function at import; on a CPU that is the sub-quadratic one, which reads the free
    memory on every call (a graph break, and a guard on the number of free bytes, which recompiles whenever it
    changes). FLUX's attention is set to ComfyUI's PyTorch attention here, as on a GPU, so the counts measure
    the model and the patch.

    Asserted: the unpatched MODEL compiles once (the control: 1 graph, no break, nothing after step 1); the
    patched one gives the uncompiled result with the character acting; after two warm-up steps (the first
    compiles, the second may recompile once for a value that changes every step) steps 3..6 compile, recompile
    and break nothing more; and dynamo never hits its recompile limit (where it silently stops compiling a
    frame, which also stops the counts from growing)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    steps = 6
    model = _comfy_model(comfy, tiny_flux)
    patched = _apply(model, tiny_adapter, features, 0.9)
    plain = _sample(model, tiny_flux, steps)
    eager = _sample(patched, tiny_flux, steps)

    with caplog.at_level(logging.WARNING):
        plain_compiled, control, _ = _compiled_run(model, tiny_flux, steps)
        out, history, breaks = _compiled_run(patched, tiny_flux, steps)
    limit = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    diff = (out - eager).abs().max().item()
    print("\nTorchCompileModel (dynamo counts after each of the 6 steps)")
    for name, counts in (("unpatched MODEL", control), ("patched MODEL", history)):
        print(f"  {name}: frames {_per_step(counts, 'frames')}, graphs {_per_step(counts, 'graphs')}, "
              f"graph breaks {_per_step(counts, 'graph_breaks')}")
    summary = {}
    for reason, count in breaks.items():
        lines = reason.splitlines()
        context = next((line.strip() for line in lines if "Developer debug context" in line), "")
        key = f"{lines[0]} | {re.sub(r'int: [0-9]+', 'int: N', context)[:140]}"
        summary[key] = summary.get(key, 0) + count
    for key, count in summary.items():
        print(f"  graph break x{count}: {key}")
    for message in limit:
        print("  " + " / ".join(message.splitlines()[:3]))
    print(f"  compiled vs eager: max diff {diff:.2e}; character effect {(eager - plain).abs().max():.2e}; "
          f"recompile limit hit {len(limit)} times")

    assert control[-1] == control[0], "the unpatched MODEL recompiles per step: the control is not valid"
    assert (plain_compiled - plain).abs().max() <= 1e-5
    assert diff <= 1e-5 and (eager - plain).abs().max() > 1e-3
    assert history[-1] == history[1], (
        f"the patched MODEL keeps compiling after warm-up: graphs after each step {_per_step(history, 'graphs')}, "
        f"frames {_per_step(history, 'frames')}")
    assert not limit, limit[0]
