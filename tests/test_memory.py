"""Placement and streaming logic. On the CPU the same hooks, flat buffers, views and copies run (the "device"
buffers are CPU tensors); the CUDA tests (streams, events, page-locked memory) skip without a GPU."""

import functools

import pytest
import torch
from PIL import Image

from instantcharacter.run.offload import placement as placement_module
from instantcharacter.run.offload.placement import Placement
from instantcharacter.run.offload.planner import GIB, choose_offload, module_bytes, partial_budgets, plan_residency
from instantcharacter.run.offload.streamer import BlockStreamer
from instantcharacter.run.offload.streams import StreamProbes
from generation import run as run_generation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (side stream, events, page-locked memory)")


def test_plan_residency_extremes_and_spread():
    sizes = [10] * 8
    assert plan_residency(sizes, 1000) == [True] * 8
    assert plan_residency(sizes, 5) == [False] * 8
    half = plan_residency(sizes, 40)
    assert sum(half) == 4
    # streamed blocks are spread out, not bunched at one end
    streamed = [i for i, r in enumerate(half) if not r]
    assert max(b - a for a, b in zip(streamed, streamed[1:])) <= 3
    assert sum(plan_residency([10, 30, 10, 30], 45)) == 2


def test_plan_residency_counts_the_buffers_in_flight():
    sizes = [10] * 8

    def two_buffers(resident):  # two buffers of a block's size as soon as one streams
        return 0 if all(resident) else 20

    assert plan_residency(sizes, 80, two_buffers) == [True] * 8
    # 79 cannot keep all 8; streaming one costs 10 and saves 10: the plan keeps 5 (50 + 20 ≤ 79), not 7
    assert sum(plan_residency(sizes, 79, two_buffers)) == 5
    assert plan_residency(sizes, 10, two_buffers) == [False] * 8  # nothing fits: everything streams


def test_choose_offload():
    sizes = {"blocks": 26 * GIB, "transformer_rest": GIB // 5, "text_encoders": 10 * GIB, "vae": GIB // 6,
             "projector": 3 * GIB, "in_flight": 2 * GIB}
    assert choose_offload(80 * GIB, sizes).mode == "off"
    mid = choose_offload(24 * GIB, sizes)
    assert mid.mode == "budget" and 23 <= mid.budget_gb < 24
    assert choose_offload(6 * GIB, sizes).mode == "sequential"


@pytest.fixture(scope="module")
def features(tiny_encoders):
    from pathlib import Path

    return tiny_encoders.encode([Image.open(Path(__file__).resolve().parents[1] / "assets" / "reference_girl.png")])


def _run(flux, adapter, features, **kw):
    return run_generation(flux, adapter, features, "a girl", width=64, height=64, steps=2, seed=3,
                    max_sequence_length=32, decode=False, **kw).latents


def _snapshot(flux, adapter):
    params = list(flux.transformer.parameters()) + list(adapter.parameters())
    return [(p, p.data_ptr(), p.data.clone()) for p in params]


def _unchanged(snapshot, same_storage=True):
    """Every parameter has bit-identical values (and, with ``same_storage``, is in the very storage it had)."""
    return all((p.data_ptr() == ptr or not same_storage) and p.dtype == copy.dtype and p.device == copy.device
               and torch.equal(p.data, copy) for p, ptr, copy in snapshot)


def _some_streaming_budget(flux, adapter, fp8=False):
    """A budget (GiB) from the twin's group sizes at which some blocks stay and the others stream."""
    budget, resident = partial_budgets(flux.transformer, adapter, fp8)[0]
    placement = Placement(flux, adapter, "budget", "cpu", budget_gb=budget, fp8=fp8)
    assert placement.denoising_plan().resident == resident and 0 < sum(resident) < len(resident)
    placement.restore()
    return budget


def test_budget_streams_some_blocks_and_matches_off(tiny_flux, tiny_adapter, features, pack_builds):
    reference = _run(tiny_flux, tiny_adapter, features, offload="off")
    budget = _some_streaming_budget(tiny_flux, tiny_adapter)
    snapshot = _snapshot(tiny_flux, tiny_adapter)
    out = run_generation(tiny_flux, tiny_adapter, features, "a girl", width=64, height=64, steps=2, seed=3,
                         max_sequence_length=32, decode=False, offload="budget", vram_budget_gb=budget)
    assert torch.equal(out.latents, reference)
    assert _unchanged(snapshot, same_storage=False)  # the first streamed run moved them into flat buffers
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_flux.transformer.modules())
    placement = Placement(tiny_flux, tiny_adapter, "budget", "cpu", budget_gb=budget)
    plan = placement.denoising_plan()
    placement.restore()
    assert out.bytes_streamed == 2 * plan.streamed_per_pass > 0  # one copy per streamed part per step, no more
    assert out.streaming["buffers_per_size"] == 2 and out.streaming["planned_bytes"] == plan.total
    assert f"{sum(plan.resident)}/{len(plan.resident)} blocks resident" in out.offload
    # where they stay: a second run copies nothing on the host and leaves every weight in place
    snapshot = _snapshot(tiny_flux, tiny_adapter)
    built = dict(pack_builds)
    assert torch.equal(_run(tiny_flux, tiny_adapter, features, offload="budget", vram_budget_gb=budget), reference)
    assert _unchanged(snapshot) and pack_builds == built


def test_sequential_and_auto_match_off(tiny_flux, tiny_adapter, features):
    reference = _run(tiny_flux, tiny_adapter, features, offload="off")
    assert torch.equal(_run(tiny_flux, tiny_adapter, features, offload="sequential"), reference)
    assert torch.equal(_run(tiny_flux, tiny_adapter, features, offload="auto"), reference)


def test_budget_mode_needs_a_budget(tiny_flux, tiny_adapter):
    with pytest.raises(ValueError, match="budget"):
        Placement(tiny_flux, tiny_adapter, "budget", "cpu")


@pytest.mark.parametrize("mode", ["off", "budget", "sequential"])
def test_fp8_storage_is_close_and_leaves_weights_exact(tiny_flux, tiny_adapter, features, mode):
    reference = _run(tiny_flux, tiny_adapter, features, offload="off")
    snapshot = _snapshot(tiny_flux, tiny_adapter)
    budget = _some_streaming_budget(tiny_flux, tiny_adapter, fp8=True)
    fp8 = _run(tiny_flux, tiny_adapter, features, offload=mode, vram_budget_gb=budget, fp8_storage=True)
    assert _unchanged(snapshot)  # fp8 storage is a copy: the model's own weights are not touched
    assert not torch.equal(fp8, reference)  # the weights really were rounded to fp8
    rel = (fp8 - reference).norm() / reference.norm()
    assert rel < 0.1, rel


def test_fp8_copies_are_made_once_per_model(tiny_flux, tiny_adapter, features, pack_builds):
    first = _run(tiny_flux, tiny_adapter, features, offload="sequential", fp8_storage=True)
    built = pack_builds["copy"]
    again = _run(tiny_flux, tiny_adapter, features, offload="budget", vram_budget_gb=3.0, fp8_storage=True)
    assert pack_builds["copy"] == built  # no re-quantization on the second call
    assert torch.equal(first, again)


@pytest.mark.parametrize("mode", ["off", "budget", "sequential", "fp8"])
def test_a_bf16_flux_with_an_fp32_adapter_runs_in_every_mode(tiny_models, tiny_adapter, features, mode):
    """The loaders let FLUX and the adapter have different dtypes; streaming casts the streamed weights (not the
    biases) to FLUX's dtype just before use, and the character layers must compute in whatever they get."""
    from instantcharacter.files.flux import load_flux

    flux = load_flux(tiny_models["flux"], dtype=torch.bfloat16)
    budget = _some_streaming_budget(flux, tiny_adapter)
    settings = {"off": dict(offload="off"), "budget": dict(offload="budget", vram_budget_gb=budget),
                "sequential": dict(offload="sequential"),
                "fp8": dict(offload="budget", vram_budget_gb=budget, fp8_storage=True)}[mode]
    out = _run(flux, tiny_adapter, features, **settings)
    reference = _run(flux, tiny_adapter, features, offload="off")
    assert torch.isfinite(out).all()
    assert (out - reference).norm() / reference.norm() < 0.1


def test_streamer_materializes_only_around_use():
    blocks = [torch.nn.Linear(4, 4) for _ in range(4)]
    extras = [[torch.nn.Linear(4, 4)] for _ in range(4)]
    originals = [b.weight.data.clone() for b in blocks]
    seen = []

    def check(i):
        def hook(module, args):
            seen.append((i, blocks[i].weight.dtype, [b.weight.dtype for b in blocks]))
        return hook

    streamer = BlockStreamer(blocks, extras, torch.device("cpu"), [True, False, True, False], torch.float32,
                             storage_dtype=torch.float8_e4m3fn, prefetch=False)
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(check(i))  # runs after the streamer's own pre-hook
    assert all(b.weight.dtype == torch.float8_e4m3fn for b in blocks)  # stored, not materialized
    x = torch.randn(2, 4)
    for b in blocks:
        x = b(x)
    assert [d for _, d, _ in seen] == [torch.float32] * 4  # each block computed in fp32
    # without prefetch, only the running block is materialized
    assert all(sum(d == torch.float32 for d in dtypes) == 1 for _, _, dtypes in seen)
    assert all(b.weight.dtype == torch.float8_e4m3fn for b in blocks)  # and released after use
    streamer.close()
    assert all(b.weight.dtype == torch.float32 and torch.equal(b.weight.data, o) for b, o in zip(blocks, originals))
    assert all(len(b._forward_pre_hooks) == 1 and not b._forward_hooks for b in blocks)  # only ours is left


def test_the_transformer_phase_releases_its_device_copies_before_decode(tiny_flux, tiny_adapter):
    budget = _some_streaming_budget(tiny_flux, tiny_adapter)
    placement = Placement(tiny_flux, tiny_adapter, "budget", "cpu", budget_gb=budget)
    with placement.denoising(passes=1):
        parts = [part for g in placement.streamer.groups for part in g.parts]
        assert any(part.resident is not None for part in parts)  # the kept blocks' device copies
        assert all(p.data_ptr() == t.data_ptr() for part in parts if part.resident is not None
                   for p, t in zip(part.params, part.stored))
    assert all(part.resident is None and not part.held for part in parts)
    assert not placement.streamer.pools.all()
    placement.restore()


def test_module_bytes_fp8_halves_bf16():
    m = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    assert module_bytes([m], torch.float8_e4m3fn) * 2 == module_bytes([m])


@needs_cuda
@pytest.mark.parametrize("mode", ["budget", "sequential", "fp8"])
def test_cuda_streaming_streams_and_matches_resident(tiny_flux, tiny_adapter, features, mode):
    fp8 = mode == "fp8"
    budget = _some_streaming_budget(tiny_flux, tiny_adapter, fp8)
    reference = _run(tiny_flux, tiny_adapter, features, offload="off", device="cuda")
    if fp8:  # the same fp8 rounding, everything resident
        reference = _run(tiny_flux, tiny_adapter, features, offload="off", device="cuda", fp8_storage=True)
    settings = dict(offload="sequential") if mode == "sequential" else dict(offload="budget", vram_budget_gb=budget)
    out = run_generation(tiny_flux, tiny_adapter, features, "a girl", width=64, height=64, steps=2, seed=3,
                         max_sequence_length=32, decode=False, device="cuda", fp8_storage=fp8, **settings)
    assert out.bytes_streamed > 0 and out.streaming["unpinned_bytes"] == 0 and out.streaming["pinned_bytes"] > 0
    assert out.streaming["buffers_per_size"] == (1 if mode == "sequential" else 2)
    assert torch.equal(out.latents, reference)


@needs_cuda
def test_cuda_sleeping_streams_give_the_same_latents(tiny_flux, tiny_adapter, features, monkeypatch):
    """The whole generation with copies delayed on the copy stream and every block delayed on the compute
    stream: a missing wait (or buffer reuse before its block ran) changes the latents."""
    budget = _some_streaming_budget(tiny_flux, tiny_adapter)
    reference = _run(tiny_flux, tiny_adapter, features, offload="off", device="cuda")
    t = tiny_flux.transformer
    delayed = functools.partial(BlockStreamer, probes=StreamProbes(copy_delay_cycles=5_000_000))
    monkeypatch.setattr(placement_module, "BlockStreamer", delayed)  # every streamer of the run
    slow = [b.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(5_000_000))
            for b in list(t.transformer_blocks) + list(t.single_transformer_blocks)]
    try:
        for settings in (dict(offload="budget", vram_budget_gb=budget), dict(offload="sequential")):
            streamed = _run(tiny_flux, tiny_adapter, features, device="cuda", **settings)
            assert torch.equal(streamed, reference), settings
    finally:
        for h in slow:
            h.remove()


@needs_cuda
def test_cuda_decode_starts_with_the_transformer_gone(tiny_flux, tiny_adapter, features):
    budget = _some_streaming_budget(tiny_flux, tiny_adapter)
    seen = {}

    def watch(phase, when):
        torch.cuda.synchronize()
        seen[(phase, when)] = torch.cuda.memory_allocated()

    run_generation(tiny_flux, tiny_adapter, features, "a girl", width=64, height=64, steps=2, seed=3,
                   max_sequence_length=32, offload="budget", vram_budget_gb=budget, device="cuda", on_phase=watch)
    # at the decode's start only the latents and the character tokens are left on the device
    assert seen[("decode", "start")] <= seen[("text encoders", "start")] + 8 * 2**20, seen
    assert seen[("denoising", "end")] <= seen[("text encoders", "start")] + 8 * 2**20, seen


def test_decode_plan_follows_the_budget(tiny_flux, tiny_adapter):
    from instantcharacter.run.offload.planner import vae_decode_bytes

    one_image = vae_decode_bytes(128, 128, torch.bfloat16)  # 1024²: ComfyUI's estimate, ≈ 4.3 GiB
    assert 4 * GIB < one_image < 5 * GIB
    plans = {}
    for mode, budget in (("off", None), ("sequential", None), ("budget", 16.0), ("budget", 4.0)):
        placement = Placement(tiny_flux, tiny_adapter, mode, "cpu", budget_gb=budget)
        plans[(mode, budget)] = placement.decode_plan(128, 128, torch.bfloat16)
        placement.restore()
    assert plans == {("off", None): "batch", ("sequential", None): "tiled", ("budget", 16.0): "per_image",
                     ("budget", 4.0): "tiled"}


def test_decode_per_image_and_tiled_match_batch(tiny_flux):
    from instantcharacter.run.decoding import decode_latents

    vae = tiny_flux.vae
    z = torch.randn(2, 16, 32, 24, generator=torch.Generator().manual_seed(5))
    whole = decode_latents(tiny_flux, z, "batch")
    assert whole.shape == (2, 256, 192, 3)
    torch.testing.assert_close(decode_latents(tiny_flux, z, "per_image"), whole, atol=1e-4, rtol=0)  # conv kernels differ by batch
    saved = (vae.tile_latent_min_size, vae.tile_sample_min_size)
    tiled = decode_latents(tiny_flux, z, "tiled", tile_latent=16)  # 3 × 2 overlapping tiles per image
    assert (vae.tile_latent_min_size, vae.tile_sample_min_size) == saved
    assert tiled.shape == whole.shape
    # same picture; the tiles see less context near the seams, so pixels there differ a little
    assert (tiled - whole).abs().mean() < 0.02 and not torch.equal(tiled, whole)
    with pytest.raises(ValueError):
        decode_latents(tiny_flux, z, "bogus")


def test_generation_reports_its_placement(tiny_flux, tiny_adapter, features):
    out = run_generation(tiny_flux, tiny_adapter, features, "a girl", width=64, height=64, steps=2, seed=3,
                   max_sequence_length=32, offload="sequential")
    # on the CPU the streamed blocks are copied too (into CPU buffers): the same code path as on a GPU
    assert out.offload == "sequential" and out.decode == "tiled" and out.bytes_streamed > 0
    off = run_generation(tiny_flux, tiny_adapter, features, "a girl", width=64, height=64, steps=2, seed=3,
                   max_sequence_length=32, offload="auto")
    assert off.offload.startswith("off (not a CUDA device") and off.decode == "batch"
    # one 64² image fits in one tile: the tiled decode is the plain one
    torch.testing.assert_close(out.images, off.images, atol=1e-5, rtol=0)


def test_t5_streams_when_it_does_not_fit_and_gives_the_same_embeddings(tiny_flux, tiny_adapter):
    from instantcharacter.run.pipeline import _encode_prompts
    from instantcharacter.run.settings import GenerationSettings

    t5 = tiny_flux.text_encoder_2
    settings = GenerationSettings("a girl in a red coat", max_sequence_length=32)
    reference = _encode_prompts(tiny_flux, settings, "cpu")[0]
    snapshot = [(p, p.data_ptr(), p.data.clone()) for p in t5.parameters()]
    seen = []
    probe = t5.encoder.block[1].register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_pre_hooks)))
    try:
        # a budget below T5's size: the blocks get streaming hooks (the probe sees ours too)
        for mode, budget in (("budget", 0.01), ("sequential", None)):
            placement = Placement(tiny_flux, tiny_adapter, mode, "cpu", budget_gb=budget)
            with placement.encoding_prompts():
                got = _encode_prompts(tiny_flux, settings, "cpu")[0]
            placement.restore()
            for a, b in zip(got, reference):
                assert torch.equal(a, b)
        big = Placement(tiny_flux, tiny_adapter, "budget", "cpu", budget_gb=40.0)  # fits: T5 visits whole
        with big.encoding_prompts():
            _encode_prompts(tiny_flux, GenerationSettings("a girl", max_sequence_length=32), "cpu")
    finally:
        probe.remove()
    assert seen == [2, 2, 1]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in t5.modules())
    assert all(p.data_ptr() == ptr and torch.equal(p.data, copy) for p, ptr, copy in snapshot)


def test_auto_no_longer_needs_room_for_t5():
    sizes = {"blocks": 26 * GIB, "transformer_rest": GIB // 5, "text_encoders": 10 * GIB, "vae": GIB // 6,
             "projector": 3 * GIB, "in_flight": 2 * GIB}
    # an 8 GB card: T5 (10 GB) would not fit whole, but it streams, so a budget is still possible
    choice = choose_offload(8 * GIB, sizes)
    assert choice.mode == "budget" and 7 <= choice.budget_gb < 8


def test_plan_residency_respects_bytes_of_mixed_blocks():
    # FLUX: 19 double blocks (+ character layer) of 0.68 GiB, 38 single ones of 0.31 GiB
    sizes = [68] * 19 + [31] * 38
    for budget in (1, 100, 500, 1000, 1200, 1500, 2000, 2500):
        resident = plan_residency(sizes, budget)
        kept = sum(s for s, keep in zip(sizes, resident) if keep)
        assert kept <= budget
        # nothing left unused that a streamed block would fit in (within one double block)
        assert budget - kept < 68 + 31 * 2 or all(resident)
        streamed = [i for i, keep in enumerate(resident) if not keep]
        if 1 < len(streamed) < len(sizes):
            gaps = [b - a for a, b in zip(streamed, streamed[1:])]
            assert max(gaps) - min(gaps) <= 2  # evenly spread through the doubles and the singles
    assert plan_residency(sizes, sum(sizes)) == [True] * 57
