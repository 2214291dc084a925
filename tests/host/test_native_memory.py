"""The adapter's memory on the native path is ComfyUI's to manage: counted once, loaded once, partly loaded
under a small budget with the rest cast per call by ComfyUI's own layers, and never moved by the pack.

ComfyUI's model management runs for real; only the device is a stand-in (no GPU here): the second CPU device
where values must be computed, the ``meta`` device where only the bookkeeping is checked (ComfyUI treats any
CPU device as "no VRAM" and loads fully, so a partial load needs a non-CPU device).
"""

import gc
import importlib
import logging

import pytest
import torch

import test_native
from test_native import _apply, _comfy_call, _inputs, _model_patcher, _patches

comfy_flux = test_native.comfy_flux  # the fixture, shared

META = torch.device("meta")


def _memory():
    return importlib.import_module("instantcharacter_pack_native.nodes.adapter_patcher")


@pytest.fixture
def fresh(tiny_models):
    """A newly loaded adapter that ComfyUI has never seen (no patcher, plain torch layers): the session's
    ``tiny_adapter`` may already have been switched by an Apply in another test."""
    from instantcharacter.files.adapter_file import load_adapter

    def load():
        adapter = load_adapter(tiny_models["adapter"], dtype=torch.float32)
        assert not any(hasattr(m, "comfy_cast_weights") for m in adapter.modules())
        return adapter

    return load


def _bytes_on(module, device):
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type == device.type)


def _stand_in_gpu(monkeypatch, mm, device, budget, vram_state=None):
    monkeypatch.setattr(mm, "get_torch_device", lambda: device)
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 0)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: 0)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (budget, budget) if torch_free_too
                        else budget)
    if vram_state is not None:
        monkeypatch.setattr(mm, "vram_state", vram_state)


def _forget_meta_model(mm, patcher):
    """Take a model loaded onto ``meta`` out of ComfyUI's list without unloading it (meta holds no data to move
    back); the adapter copy is thrown away."""
    for loaded in [lm for lm in mm.current_loaded_models if lm.model is patcher]:
        finalizer = getattr(loaded, "_patcher_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        mm.current_loaded_models.remove(loaded)


def test_comfyui_counts_the_adapter_once_and_two_runs_reload_nothing(pack, comfy, comfy_flux, fresh, features,
                                                                     monkeypatch, caplog):
    """ComfyUI's own load_models_gpu, with the second CPU device standing in for a GPU: two chained Apply nodes
    with one adapter give one adapter model to load, counted at its full size, and a second run moves nothing."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.patcher_extension

    gpu = torch.device("cpu", 1)
    _stand_in_gpu(monkeypatch, mm, gpu, 8 * 2**30)
    adapter = fresh()
    flux = comfy.model_patcher.ModelPatcher(_model_patcher(comfy, comfy_flux).model, load_device=gpu,
                                            offload_device=torch.device("cpu"))
    loads = []
    try:
        with caplog.at_level(logging.INFO):
            # the second run re-executes both Apply nodes, as after a changed weight
            for weights in ((0.5, 0.4), (0.6, 0.3)):
                twice = _apply(_apply(flux, adapter, features, weights[0]), adapter, features, weights[1])
                models = [twice] + twice.get_nested_additional_models()
                ours = [m for m in models if m.model is adapter]
                assert len(ours) == 1 and ours[0].load_device == gpu
                if not loads:
                    ours[0].add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD,
                                         lambda *a, **k: loads.append("adapter"))
                mm.load_models_gpu(models)
                counted = [lm for lm in mm.current_loaded_models if lm.model.model is adapter]
                assert len(counted) == 1
                assert counted[0].model_loaded_memory() == mm.module_size(adapter)
                del twice, models, ours, counted
                gc.collect()
            assert loads == ["adapter"]  # loaded by the first run only
            mm.cleanup_models_gc()
        assert not [r for r in caplog.records if "memory leak" in r.getMessage()]
    finally:
        mm.unload_all_models()


def test_every_adapter_layer_becomes_a_comfyui_layer_with_the_same_weights(pack, comfy, fresh):
    adapter = fresh()
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    _memory().make_comfy_managed(adapter)
    after = adapter.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    unmanaged = [n for n, m in adapter.named_modules() if next(m.parameters(recurse=False), None) is not None
                 and not hasattr(m, "comfy_cast_weights") and not getattr(m, "casts_own_parameters", False)]
    assert not unmanaged, unmanaged
    assert sum(hasattr(m, "comfy_cast_weights") for m in adapter.modules()) > 4 * adapter.num_layers


def test_an_adapter_with_a_layer_comfyui_cannot_manage_is_refused_by_name(pack, comfy, fresh):
    adapter = fresh()
    adapter.image_proj.add_module("extra", torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(Exception, match=r"image_proj\.extra \(Conv1d\)") as raised:
        _memory().make_comfy_managed(adapter)
    assert type(raised.value).__name__ == "UnsupportedModelError"
    assert not hasattr(adapter.ip_adapter[0].to_k_ip, "comfy_cast_weights")  # nothing switched


def test_a_partial_load_is_counted_as_it_lies_and_the_character_moves_nothing(pack, comfy, fresh, features,
                                                                              monkeypatch):
    """A budget of half the adapter: ComfyUI loads part of it and counts exactly the bytes that went to the
    device; the rest stays on the offload device marked for casting; a character call on the device computes
    every layer without moving any of it (before: the pack's own ``.to()`` moved the layers behind
    ComfyUI's back)."""
    import comfy.model_management as mm

    from instantcharacter.run.native_characters import CallState, AppliedCharacter, CharacterSet

    adapter = fresh()
    _stand_in_gpu(monkeypatch, mm, META, 8 * 2**30, vram_state=mm.VRAMState.NO_VRAM)
    patcher = _memory().adapter_patcher(adapter)
    size = mm.module_size(adapter)
    try:
        mm.load_models_gpu([patcher])  # --novram: ComfyUI loads nothing and marks every layer for casting
        assert _bytes_on(adapter, META) == patcher.loaded_size() == 0
        patcher.partially_load(META, extra_memory=size // 2)  # what ComfyUI does when memory frees up
        counted = patcher.loaded_size()
        assert 0 < counted < size
        assert _bytes_on(adapter, META) == counted  # ComfyUI's count is what lies on the device
        offloaded = [m for m in adapter.modules()
                     if hasattr(m, "comfy_cast_weights") and next(m.parameters()).device.type == "cpu"]
        assert offloaded and all(m.comfy_cast_weights for m in offloaded)
        placement = {n: p.device.type for n, p in adapter.named_parameters()}

        run = CharacterSet((AppliedCharacter(adapter, features, 0.9),)).run()
        call = run.call(CallState(sigma=0.6, negative_rows=(False, True), text_len=4, grid=(2, 3), image_tokens=6,
                                  device=META), [adapter])
        hidden = adapter.hidden_size
        query = torch.empty(2, 6, hidden, device=META)
        for layer in range(adapter.num_layers):
            out = call.delta(layer, query)
            assert out.shape == (2, 6, hidden) and out.device == META
        assert {n: p.device.type for n, p in adapter.named_parameters()} == placement
        assert patcher.loaded_size() == counted
    finally:
        _forget_meta_model(mm, patcher)


def test_with_the_adapter_left_offloaded_comfyuis_casting_gives_the_same_result(pack, comfy, comfy_flux,
                                                                                tiny_flux, fresh, features,
                                                                                monkeypatch):
    """--novram leaves every adapter layer on the offload device with ComfyUI's casting on; a model call then
    runs through ComfyUI's cast path and gives the fully loaded result bit for bit."""
    import comfy.model_management as mm

    from instantcharacter.run.native_characters import AppliedCharacter

    adapter = fresh()
    x, ctx, pooled = _inputs(tiny_flux)
    loaded = _comfy_call(comfy_flux, x, ctx, pooled, 0.7, _patches(pack, comfy_flux, [AppliedCharacter(adapter, features, 0.9)]))

    _stand_in_gpu(monkeypatch, mm, META, 8 * 2**30, vram_state=mm.VRAMState.NO_VRAM)
    patcher = _memory().adapter_patcher(adapter)
    try:
        mm.load_models_gpu([patcher])
        linears = [m for m in adapter.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.comfy_cast_weights for m in linears)
        casting = _comfy_call(comfy_flux, x, ctx, pooled, 0.7,
                              _patches(pack, comfy_flux, [AppliedCharacter(adapter, features, 0.9)]))
    finally:
        mm.unload_all_models()
        patcher.detach()
    assert torch.equal(casting, loaded)
    plain = _comfy_call(comfy_flux, x, ctx, pooled, 0.7, _patches(pack, comfy_flux, []))
    assert not torch.equal(casting, plain)


@pytest.mark.parametrize("offload", ["off", "sequential"])
def test_the_pipeline_path_is_unchanged_by_comfyui_managing_the_adapter(pack, comfy, tiny_flux, fresh, features,
                                                                        offload):
    """The Sampler and Apply share one loaded adapter: after Apply switched its layers to ComfyUI's, the
    pipeline path gives the same latents as with plain torch layers."""
    from generation import run

    plain, managed = fresh(), fresh()
    _memory().make_comfy_managed(managed)
    args = dict(width=64, height=64, steps=2, seed=3, max_sequence_length=32, offload=offload, device="cpu")
    a = run(tiny_flux, plain, features, "a girl in a red coat", **args)
    b = run(tiny_flux, managed, features, "a girl in a red coat", **args)
    assert torch.equal(a.latents, b.latents)

