"""The native path under today's ComfyUI runtime: MultiGPU CFG Split, Select Model Device, model calls in
threads, and the patcher class dynamic VRAM needs. In-process, CPU, fp32, tiny FLUX.

No GPU here: ``torch.device("cpu")`` and ``torch.device("cpu", 1)`` stand in for two devices. They are different
keys to ComfyUI (its per-device clones, its thread pool, its cond scheduler), and tensors on either are plain CPU
tensors, so ComfyUI's multi-GPU code runs as on two GPUs, threads included, with values that can be compared.
What only a GPU shows (dynamic VRAM's loader, transfers between cards) is named where it is stood in for.
"""

import importlib
import threading

import pytest
import torch

from test_native import _apply, _inputs, _overlapping_halves
from test_native_compat import _comfy_model, _model_call, _node_output, _sample

CPU, CPU1 = torch.device("cpu"), torch.device("cpu", 1)
STEPS = 3


def _needs(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(f"this ComfyUI has no {module} ({what}, ComfyUI v0.22 and newer)")


@pytest.fixture
def adapter_from_file(tiny_models):
    """A newly loaded adapter (from its file, as Load Adapter loads it): ComfyUI's per-device copies of it are
    loaded from the same file."""
    from instantcharacter.files.adapter_file import load_adapter

    return lambda: load_adapter(tiny_models["adapter"], dtype=torch.float32)


@pytest.fixture(scope="module")
def flux_file(tiny_flux, tmp_path_factory):
    from safetensors.torch import save_file

    from instantcharacter.testing.single_file import bfl_flux_state_dict

    path = tmp_path_factory.mktemp("unet") / "flux1-dev-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_flux_state_dict(tiny_flux.transformer).items()}, str(path))
    return path


def _file_model(comfy, flux_file):
    """The MODEL UNETLoader makes from a file (with ComfyUI's reload factory, which its multi-GPU copies need)."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(flux_file), model_options={"dtype": torch.float32})
    if model is None or model.model.diffusion_model.hidden_size != 256:
        pytest.skip("this ComfyUI's UNETLoader cannot read a tiny FLUX (its detection fixes FLUX.1's widths)")
    model.model.eval()
    return model


@pytest.fixture
def two_devices(comfy, monkeypatch):
    import comfy.model_management as mm

    _needs("comfy.multigpu", "multi-GPU")
    monkeypatch.setattr(mm, "get_all_torch_devices", lambda exclude_current=False: [CPU, CPU1])
    yield
    mm.unload_all_models()


class _Uses:
    """Which adapter copy computed the character attention, in which thread (CharacterCall.delta)."""

    def __init__(self):
        self.call_class = importlib.import_module(
            "instantcharacter_pack_native.instantcharacter.run.native_characters").CharacterCall
        self.seen = []
        self.lock = threading.Lock()

    def __enter__(self):
        delta, seen, lock = self.call_class.delta, self.seen, self.lock
        self.original = delta

        def recording(call, *args, **kwargs):
            with lock:
                seen.append((call.acting[0].adapter, threading.get_ident()))
            return delta(call, *args, **kwargs)

        self.call_class.delta = recording
        return self

    def __exit__(self, *exc):
        self.call_class.delta = self.original

    def adapters(self):
        return {id(a): a for a, _ in self.seen}

    def threads(self):
        return {t for _, t in self.seen}


def _adapter_copy(model_patcher, adapter):
    memory = importlib.import_module("instantcharacter_pack_native.nodes.adapter_patcher")
    [patcher] = model_patcher.get_additional_models_with_key(memory.adapter_key(adapter))
    return patcher


# --- MultiGPU CFG Split ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["apply_then_split", "split_then_apply"])
def test_multigpu_cfg_split_gives_the_single_device_result_with_each_device_on_its_own_adapter(
        comfy, pack, tiny_flux, flux_file, adapter_from_file, features, two_devices, order):
    """MultiGPU CFG Split (comfy_extras.nodes_multigpu) before or after Apply, two stand-in devices, CFG 2: the
    positive and negative passes run at the same time in ComfyUI's thread pool, each on its device's copy of
    FLUX and of the adapter (the second copy loaded from the adapter's file). The latents equal the
    single-device run's and differ from the run without the character."""
    multigpu = _needs("comfy_extras.nodes_multigpu", "MultiGPU CFG Split")

    def split(model):
        return _node_output(multigpu.MultiGPUCFGSplitNode.execute(model, 2))

    adapter = adapter_from_file()
    model = _file_model(comfy, flux_file)
    single = _sample(_apply(model, adapter, features), tiny_flux, STEPS)
    plain = _sample(model, tiny_flux, STEPS)
    if order == "apply_then_split":
        patched = split(_apply(model, adapter, features))
    else:
        patched = _apply(split(model), adapter, features)
    with _Uses() as uses:
        out = _sample(patched, tiny_flux, STEPS)
    diff = (out - single).abs().max().item()
    print(f"\n{order}: CFG split vs one device: max diff {diff:.2e}; character effect "
          f"{(single - plain).abs().max():.2e}; adapter copies used {len(uses.adapters())}, threads "
          f"{len(uses.threads())}")
    assert diff <= 1e-5 and (single - plain).abs().max() > 1e-3
    [clone] = patched.get_additional_models_with_key("multigpu")
    copy = _adapter_copy(clone, adapter)
    assert clone.load_device == CPU1 and copy.load_device == CPU1 and copy.model is not adapter
    assert set(uses.adapters()) == {id(adapter), id(copy.model)}  # each device on its own copy
    assert len(uses.threads()) == 2  # the two passes ran in two threads


def test_a_second_run_through_the_cfg_split_loads_no_new_adapter_copy(
        comfy, pack, tiny_flux, flux_file, adapter_from_file, features, two_devices):
    multigpu = _needs("comfy_extras.nodes_multigpu", "MultiGPU CFG Split")
    adapter = adapter_from_file()
    patched = _node_output(multigpu.MultiGPUCFGSplitNode.execute(_apply(_file_model(comfy, flux_file), adapter,
                                                                        features), 2))
    first = _sample(patched, tiny_flux, STEPS)
    [clone] = patched.get_additional_models_with_key("multigpu")
    copy = _adapter_copy(clone, adapter).model
    assert torch.equal(_sample(patched, tiny_flux, STEPS), first)
    [clone] = patched.get_additional_models_with_key("multigpu")
    assert _adapter_copy(clone, adapter).model is copy


# --- Select Model Device -----------------------------------------------------------------------------------------

def _select(multigpu, model, device):
    return _node_output(multigpu.SelectModelDeviceNode.execute(model, device))


@pytest.mark.parametrize("order", ["select_then_apply", "apply_then_select"])
def test_select_model_device_puts_the_character_on_the_selected_devices_adapter(
        comfy, pack, tiny_flux, flux_file, adapter_from_file, features, two_devices, order):
    """Select Model Device "gpu:1" (here the stand-in second device) before or after Apply: the character acts,
    computed by the adapter copy on that device, and the result is the one on the first device."""
    multigpu = _needs("comfy_extras.nodes_multigpu", "Select Model Device")
    adapter = adapter_from_file()
    model = _file_model(comfy, flux_file)
    expected = _sample(_apply(model, adapter, features), tiny_flux, STEPS)
    plain = _sample(model, tiny_flux, STEPS)
    if order == "select_then_apply":
        patched = _apply(_select(multigpu, model, "gpu:1"), adapter, features)
    else:
        patched = _select(multigpu, _apply(model, adapter, features), "gpu:1")
    assert patched.load_device == CPU1
    with _Uses() as uses:
        out = _sample(patched, tiny_flux, STEPS)
    copy = _adapter_copy(patched, adapter)
    assert copy.load_device == CPU1 and copy.model is not adapter
    assert set(uses.adapters()) == {id(copy.model)}
    assert torch.equal(out, expected) and (out - plain).abs().max() > 1e-3


def test_select_model_devices_copy_for_a_gpu_carries_the_adapter_along(
        comfy, pack, tiny_flux, flux_file, adapter_from_file, features, two_devices):
    """For a GPU, Select Model Device copies the MODEL with ComfyUI's reload factory (its ``_retarget_patcher``);
    the stand-in second device is a CPU, for which the node takes its CPU branch instead, so the GPU branch is
    called directly here: the copy brings its own adapter, loaded from the adapter's file."""
    multigpu = _needs("comfy_extras.nodes_multigpu", "Select Model Device")
    adapter = adapter_from_file()
    model = _file_model(comfy, flux_file)
    patched = _apply(model, adapter, features)
    expected = _sample(patched, tiny_flux, STEPS)
    moved = multigpu._retarget_patcher(patched.clone(), CPU1, CPU)
    copy = _adapter_copy(moved, adapter)
    assert moved.load_device == CPU1 and copy.load_device == CPU1 and copy.model is not adapter
    with _Uses() as uses:
        out = _sample(moved, tiny_flux, STEPS)
    assert set(uses.adapters()) == {id(copy.model)} and torch.equal(out, expected)


# --- model calls in threads --------------------------------------------------------------------------------------

class _Rendezvous:
    """Holds every thread in the first double block until all of them are inside their model call (after each
    set up its call), then lets them run their blocks at the same time: the interleaving that made a shared
    per-call state drop or mix the characters."""

    def __init__(self, diffusion, parties):
        self.barrier = threading.Barrier(parties, timeout=30)
        self.handle = diffusion.double_blocks[0].register_forward_pre_hook(lambda m, a: self.wait())
        self.enabled = True

    def wait(self):
        if self.enabled:
            self.barrier.wait()

    def close(self):
        self.handle.remove()


def _concurrently(jobs, rendezvous=None):
    """Run every job in its own thread at once; their results in order (exceptions re-raised)."""
    results, errors = [None] * len(jobs), []

    def run(i, job):
        try:
            results[i] = job()
        except Exception as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            if rendezvous is not None:
                rendezvous.barrier.abort()

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


REPEATS = 12


def test_threads_calling_patched_models_at_once_get_their_sequential_results(
        comfy, pack, tiny_flux, tiny_encoders, adapter_from_file, features):
    """Two threads call the same patched MODEL (a positive-only character, different sigmas and cond/uncond
    layouts), and two more call a second MODEL of the same FLUX with two other characters in regions, all at
    once, many times, half of the rounds forced to interleave inside the blocks. Every result equals the same
    call made alone. (Before: one shared per-call state and module hooks that fired for every thread gave wrong
    pictures without an error, e.g. both outputs equal to the unpatched one.)"""
    from pathlib import Path

    from PIL import Image

    waving = tiny_encoders.encode([Image.open(Path(__file__).resolve().parents[2] / "assets" /
                                              "reference_girl_wave.png")])
    adapter = adapter_from_file()
    model = _comfy_model(comfy, tiny_flux)
    one = _apply(model, adapter, features, 0.9, negative=False)
    left, right = _overlapping_halves()
    two = _apply(_apply(model, adapter, features, 0.8, mask=left), adapter, waving, 0.6, mask=right)
    x, ctx, pooled = _inputs(tiny_flux)
    calls = [(one, 0.7, (0, 1)), (one, 0.4, (1, 0)), (two, 0.6, (0, 1)), (two, 0.3, (0,))]

    def job(patched, sigma, chunks):
        rows = x[:len(chunks) * (x.shape[0] // 2)] if len(chunks) == 1 else x
        return lambda: _model_call(patched, rows, ctx[:rows.shape[0]], pooled[:rows.shape[0]], sigma, chunks)

    jobs = [job(*c) for c in calls]
    alone = [j() for j in jobs]
    plain = _model_call(model, x, ctx, pooled, 0.7, (0, 1))
    assert (alone[0] - plain).abs().max() > 1e-3  # the character acts
    rendezvous = _Rendezvous(model.model.diffusion_model, len(jobs))
    mismatches = 0
    try:
        for round_ in range(REPEATS):
            rendezvous.enabled = round_ % 2 == 0
            for got, want in zip(_concurrently(jobs, rendezvous), alone):
                mismatches += not torch.equal(got, want)
    finally:
        rendezvous.close()
    print(f"\n{REPEATS} rounds × {len(jobs)} concurrent model calls (half forced to interleave): "
          f"{mismatches} results differ from the call made alone")
    assert mismatches == 0


# --- the adapter as core's add-on models are made -----------------------------------------------------------------

def test_the_adapter_patcher_is_cores_patcher_and_keeps_a_flux_load_dynamic(
        comfy, pack, comfy_flux_patcher, adapter_from_file, features, monkeypatch):
    """ComfyUI's main.py swaps ``CoreModelPatcher`` for its dynamic-VRAM patcher at start-up where dynamic VRAM is
    on, and ``load_models_gpu`` frees memory the dynamic way only if every model of the load is dynamic. Dynamic
    VRAM needs CUDA (comfy-aimdo), so a patcher class that says it is dynamic stands in for it, on a stand-in
    device: the adapter's patcher is made with whatever ``CoreModelPatcher`` is when Apply first uses it, and a
    load of FLUX + adapter keeps the dynamic way (before: a plain ModelPatcher turned it off for FLUX too). What
    the dynamic loader then does on a GPU is not checked here."""
    import comfy.model_management as mm
    import comfy.model_patcher

    class StandInDynamic(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

    if not hasattr(comfy.model_patcher, "CoreModelPatcher"):
        pytest.skip("this ComfyUI has no CoreModelPatcher (dynamic VRAM arrived in v0.16)")
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", StandInDynamic)
    gpu = torch.device("meta")
    monkeypatch.setattr(mm, "get_torch_device", lambda: gpu)
    adapter = adapter_from_file()
    flux = StandInDynamic(comfy_flux_patcher.model, load_device=gpu, offload_device=CPU)
    patched = _apply(flux, adapter, features)
    models = [patched] + patched.get_nested_additional_models()
    ours = _adapter_copy(patched, adapter)
    assert type(ours) is StandInDynamic and ours.cached_patcher_init is not None

    seen = []

    class Stop(Exception):
        pass

    def free_memory(memory_required, device, keep_loaded=[], for_dynamic=False, **kwargs):
        seen.append(for_dynamic)
        raise Stop

    monkeypatch.setattr(mm, "free_memory", free_memory)
    with pytest.raises(Stop):
        mm.load_models_gpu(models)
    assert seen == [True]


@pytest.fixture
def comfy_flux_patcher(comfy, tiny_flux):
    return _comfy_model(comfy, tiny_flux)


def test_the_reload_factory_gives_a_fresh_managed_adapter_and_a_non_dynamic_one_on_request(
        comfy, pack, adapter_from_file):
    import comfy.model_patcher

    memory = importlib.import_module("instantcharacter_pack_native.nodes.adapter_patcher")
    adapter = adapter_from_file()
    patcher = memory.adapter_patcher(adapter)
    factory, args = patcher.cached_patcher_init
    copy = factory(*args)
    plain = factory(*args, disable_dynamic=True)
    for made in (copy, plain):
        assert made.model is not adapter and made.cached_patcher_init == patcher.cached_patcher_init
        assert all(torch.equal(a, b) for a, b in zip(made.model.state_dict().values(), adapter.state_dict().values()))
        assert all(hasattr(m, "comfy_cast_weights") for m in made.model.modules() if isinstance(m, torch.nn.Linear))
    assert type(plain) is comfy.model_patcher.ModelPatcher
