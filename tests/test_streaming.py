"""The block streamer on its own: flat host buffers, views, at most two device buffers per size, the fp8 copies made
once, and the order of copies, events and waits. On the CPU the same code runs with CPU tensors as the device
buffers; the CUDA variants (streams, events, page-locked memory, a stress with sleeping streams) skip without a GPU."""

import gc
from collections import defaultdict

import pytest
import torch
from torch import nn

from instantcharacter.run.offload import host_packs
from instantcharacter.run.offload.host_packs import host_pack
from instantcharacter.run.offload.layout import ALIGN, make_layout
from instantcharacter.run.offload.streamer import BlockStreamer
from instantcharacter.run.offload.streams import StreamProbes

FP8 = torch.float8_e4m3fn
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA GPU (streams, events, pinned memory)"))
DEVICES = ["cpu", CUDA]


class Block(nn.Module):
    """A stand-in FLUX block: its own weights, plus a layer owned elsewhere (like the adapter's character layer)
    that runs inside it."""

    def __init__(self, width: int, depth: int, extra: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self._extra = [extra]  # not a sub-module: another model owns it

    def forward(self, x):
        return self.norm(torch.tanh(self.layers(x))) + 0.1 * self._extra[0](x)[..., :x.shape[-1]]


def chain(seed=0, width=32, depths=(2, 2, 1, 1, 1, 1)):
    """Blocks of two sizes (like FLUX's double and single blocks), each with a layer of a third size."""
    torch.manual_seed(seed)
    extras = [nn.Linear(width, 3 * width, bias=False) for _ in depths]
    blocks = [Block(width, d, e) for d, e in zip(depths, extras)]
    return blocks, [[e] for e in extras]


def run_chain(blocks, x, passes=1):
    outs = []
    with torch.inference_mode():
        for _ in range(passes):
            h = x
            for b in blocks:
                h = b(h)
            outs.append(h.cpu())
    return outs


def to(blocks, device):
    for b in blocks:
        b.to(device)
        for e in b._extra:
            e.to(device)
    return blocks


def weights(blocks, extras):
    return [p for b, e in zip(blocks, extras) for m in [b, *e] for p in m.parameters()]


def snapshot(params):
    return [(p, p.data.clone(), p.data.dtype) for p in params]


def unchanged(snap):
    return all(p.dtype == dtype and p.device.type == "cpu" and torch.equal(p.data, value) for p, value, dtype in snap)


def within_limits(streamer) -> bool:
    """No size got more device buffers than the streamer's limit for it."""
    pools = streamer.pools
    return all(made <= pools.limits.get(key, 1) for key, made in pools.made.items())


def check_order(trace) -> list[str]:
    """Replay a streamer's trace under CUDA's ordering rules and list the races: a stream's work is ordered after
    another stream's only through an event it waited on (or a host synchronize). A buffer must not be written
    while an earlier read or write of it on another stream may still run, nor read before its write is done,
    nor freed before every access is done."""
    clock = {"copy": defaultdict(int), "compute": defaultdict(int)}
    events, synced = {}, defaultdict(int)
    history = defaultdict(list)  # buffer -> [(op, stream, time)]
    problems = []

    def ordered(stream, other, time):
        return other == stream or time <= synced[other] or clock[stream][other] >= time

    for n, (op, stream, key) in enumerate(trace):
        if op == "sync":
            for s in clock:
                synced[s] = clock[s][s]
            continue
        clock[stream][stream] += 1
        now = clock[stream][stream]
        if op == "record":
            events[key] = dict(clock[stream])
        elif op == "wait":
            for s, t in events[key].items():
                clock[stream][s] = max(clock[stream][s], t)
        elif op == "alloc":
            history[key] = []
        elif op in ("write", "free"):
            for prev, s, t in history[key]:
                if not ordered(stream, s, t):
                    problems.append(f"#{n} {op} on {stream} may overlap the {prev} on {s}")
            history[key].append((op, stream, now))
        elif op == "read":
            writes = [(s, t) for prev, s, t in history[key] if prev == "write"]
            if writes and not ordered(stream, *writes[-1]):
                problems.append(f"#{n} read on {stream} may run before the write on {writes[-1][0]}")
            history[key].append((op, stream, now))
    return problems


def test_layout_aligns_every_tensor_and_puts_the_cast_ones_first():
    tensors = [torch.zeros(3, 5), torch.zeros(7), torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros((), dtype=torch.int64)]
    plain = make_layout(tensors, None, torch.float32)
    assert all(off % ALIGN == 0 for off in plain.offsets) and plain.cast_nbytes == 0 and plain.compute_nbytes == 0
    assert plain.dtypes == (torch.float32, torch.float32, torch.bfloat16, torch.int64)
    fp8 = make_layout(tensors, FP8, torch.bfloat16)
    assert fp8.cast == (True, False, True, False)  # weights of 2+ dimensions; not the vector, not the integer
    assert fp8.offsets[0] == 0 and fp8.offsets[2] == ALIGN and fp8.cast_nbytes == 2 * ALIGN
    assert fp8.compute_nbytes == 2 * fp8.cast_nbytes  # bf16 copies of the fp8 bytes
    assert fp8.nbytes == 4 * ALIGN


def test_a_view_pack_rehomes_the_weights_once_and_follows_them(pack_builds):
    blocks, extras = chain()
    module = blocks[0]
    params = list(module.parameters())
    before = snapshot(params)
    pack = host_pack(module, params, None, torch.float32)
    assert pack_builds["view"] == 1 and unchanged(before)
    start, end = pack.flat.data_ptr(), pack.flat.data_ptr() + pack.flat.numel()
    assert all(start <= p.data_ptr() < end for p in params)  # the parameters are views of one flat buffer
    assert pack.flat.data_ptr() % host_packs.PAGE == 0 and pack.flat.numel() - pack.layout.nbytes < host_packs.PAGE
    assert host_pack(module, params, None, torch.float32) is pack and pack_builds["view"] == 1
    module.to(torch.float64).to(torch.float32)  # the weights moved out of the buffer ...
    gc.collect()
    assert not pack.alive  # ... which is gone with them (no host copy left behind, e.g. after "off")
    again = host_pack(module, list(module.parameters()), None, torch.float32)
    assert again is not pack and pack_builds["view"] == 2 and unchanged(before)


def test_fp8_copies_are_made_once_and_again_when_the_weights_change(pack_builds):
    blocks, extras = chain()
    for _ in range(2):
        BlockStreamer(blocks, extras, torch.device("cpu"), [False] * 6, torch.float32, FP8).close()
    assert pack_builds["copy"] == 12  # 6 blocks + 6 layers, once
    with torch.no_grad():
        blocks[2].layers[0].weight.add_(1.0)  # an in-place change: that block's fp8 copy is out of date
    BlockStreamer(blocks, extras, torch.device("cpu"), [False] * 6, torch.float32, FP8).close()
    assert pack_builds["copy"] == 13


def _fp8_rounded(blocks, extras):
    """The same chain with every weight of 2+ dimensions rounded through fp8: what fp8 storage computes."""
    import copy

    twins = copy.deepcopy((blocks, extras))
    for b, e in zip(*twins):
        b._extra = e
        for m in [b, *e]:
            for p in m.parameters():
                if p.ndim >= 2:
                    p.data = p.data.to(FP8).to(p.dtype)
    return twins


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "sequential"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("resident", [[False] * 6, [True, False, True, False, False, True]], ids=["all", "some"])
def test_streamed_chain_equals_resident_with_two_buffers_per_size(device, prefetch, fp8, resident):
    blocks, extras = chain()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    expect_blocks = _fp8_rounded(blocks, extras)[0] if fp8 else blocks
    expected = run_chain(to(expect_blocks, device), x.to(device), passes=3)
    to(expect_blocks, "cpu")
    params = weights(blocks, extras)
    before = snapshot(params)
    trace = []
    streamer = BlockStreamer(blocks, extras, torch.device(device), resident, torch.float32, FP8 if fp8 else None,
                             prefetch=prefetch, passes=3, probes=StreamProbes(trace))
    try:
        got = run_chain(blocks, x.to(device), passes=3)
    finally:
        streamer.close()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert unchanged(before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for b in blocks for m in b.modules())
    assert streamer.buffers_per_size() == (2 if prefetch else 1) and within_limits(streamer)
    stored = sum(p.pack.layout.nbytes for g in streamer.groups for p in g.parts if p.streamed)
    assert streamer.bytes_moved == 3 * stored  # one copy per part per pass, no prefetch after the last pass
    assert check_order(trace) == []
    allocs = [k for op, _, k in trace if op == "alloc"]
    frees = [k for op, _, k in trace if op == "free"]
    assert sorted(allocs) == sorted(frees) and trace.index(("sync", "host", None)) < len(trace) - len(frees)


def test_a_second_streamed_run_keeps_the_weights_where_the_first_put_them(pack_builds):
    blocks, extras = chain()
    BlockStreamer(blocks, extras, torch.device("cpu"), [False] * 6, torch.float32).close()
    params = weights(blocks, extras)
    where = [p.data_ptr() for p in params]
    built = pack_builds["view"]
    BlockStreamer(blocks, extras, torch.device("cpu"), [True, False] * 3, torch.float32).close()
    assert [p.data_ptr() for p in params] == where and pack_builds["view"] == built


def test_the_order_checker_finds_a_missing_wait():
    """The checker above is what makes the ordering test meaningful: drop one wait from a real trace and it
    reports the race."""
    blocks, extras = chain()
    trace = []
    streamer = BlockStreamer(blocks, extras, torch.device("cpu"), [False] * 6, torch.float32, passes=2,
                             probes=StreamProbes(trace))
    run_chain(blocks, torch.randn(2, 32), passes=2)
    streamer.close()
    assert check_order(trace) == []
    recorded_on = {key: stream for op, stream, key in trace if op == "record"}
    for waiter, recorder in (("copy", "compute"), ("compute", "copy")):
        waits = [i for i, (op, s, key) in enumerate(trace) if op == "wait" and s == waiter and
                 recorded_on[key] == recorder]
        # some waits are implied by later ones; most are not
        races = [bool(check_order(trace[:i] + trace[i + 1:])) for i in waits]
        assert sum(races) > len(races) / 2, (waiter, recorder, races)
    # a run whose last prefetch is never used (passes unknown): only the synchronize orders its copy before the free
    trace = []
    streamer = BlockStreamer(blocks, extras, torch.device("cpu"), [False] * 6, torch.float32,
                             probes=StreamProbes(trace))
    run_chain(blocks, torch.randn(2, 32), passes=2)
    streamer.close()
    assert check_order(trace) == []
    assert any("free" in p for p in check_order([t for t in trace if t[0] != "sync"]))


@pytest.mark.parametrize("device", DEVICES)
def test_an_exception_inside_a_block_leaves_nothing_behind(device):
    blocks, extras = chain()
    before = snapshot(weights(blocks, extras))
    calls = []

    def fail_in_the_second_pass(module, args):
        calls.append(1)
        if len(calls) == 2:  # inside the third block, with the fourth prefetched
            raise KeyboardInterrupt

    probe = blocks[2].layers.register_forward_pre_hook(fail_in_the_second_pass)
    trace = []
    streamer = BlockStreamer(blocks, extras, torch.device(device), [False] * 6, torch.float32, FP8, passes=3,
                             probes=StreamProbes(trace))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_chain(blocks, torch.randn(2, 32, device=device), passes=3)
    finally:
        streamer.close()
        probe.remove()
    assert unchanged(before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for b in blocks for m in b.modules())
    assert check_order(trace) == []
    assert sorted(k for op, _, k in trace if op == "alloc") == sorted(k for op, _, k in trace if op == "free")


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_run_in_another_order_still_get_their_own_weights(device):
    """Prefetch guesses the next block; a caller that runs them otherwise still computes right (the stale
    prefetch is evicted) and no more buffers are made."""
    blocks, extras = chain()
    x = torch.randn(3, 32, device=device)
    order = [0, 1, 3, 2, 5, 4, 1]
    to(blocks, device)
    with torch.inference_mode():
        expected = x
        for i in order:
            expected = blocks[i](expected)
    to(blocks, "cpu")
    trace = []
    streamer = BlockStreamer(blocks, extras, torch.device(device), [False] * 6, torch.float32,
                             probes=StreamProbes(trace))
    try:
        with torch.inference_mode():
            got = x
            for i in order:
                got = blocks[i](got)
    finally:
        streamer.close()
    assert torch.equal(got, expected)
    assert streamer.buffers_per_size() <= 2 and within_limits(streamer)
    assert check_order(trace) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (page-locked memory)")
def test_cuda_streamed_parts_are_page_locked_exactly():
    blocks, extras = chain(width=256)
    resident = [True, False, True, False, False, True]
    streamer = BlockStreamer(blocks, extras, torch.device("cuda"), resident, torch.float32)
    try:
        run_chain(blocks, torch.randn(2, 256, device="cuda"))
    finally:
        streamer.close()
    streamed = [p.pack for g in streamer.groups for p in g.parts if p.streamed]
    kept = [p.pack for g in streamer.groups for p in g.parts if not p.streamed]
    assert streamer.unpinned_bytes == 0 and all(p.flat.is_pinned() for p in streamed)
    assert not any(p.pinned for p in kept)
    page = host_packs.PAGE
    exact = sum(-(-p.layout.nbytes // page) * page for p in streamed)  # the streamed bytes, to the page
    assert streamer.pinned_bytes == sum(p.pinned_bytes for p in streamed) == exact
    assert host_packs.pinned_host_bytes() >= exact
    pack = streamer.groups[1].parts[0].pack
    del streamer, streamed, kept
    blocks[1].to(torch.float64)  # the block's weights leave their buffer: it is unregistered and freed
    gc.collect()
    assert not pack.alive and not pack.pinned and pack.pinned_bytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda._sleep on two streams)")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cuda_sleeping_streams_do_not_change_the_result_nor_the_memory(fp8):
    """Copies delayed on the copy stream (a missing wait for a copy reads stale weights) and compute delayed on the
    compute stream (a missing wait for a free buffer overwrites weights still in use; unbounded buffers grow the
    reserved memory while the host runs ahead): neither the result nor the peak reserved memory may move."""
    blocks, extras = chain(width=512, depths=(3, 3, 1, 1, 1, 1, 1, 1))
    storage = FP8 if fp8 else None
    x = torch.randn(64, 512, device="cuda")
    expect_blocks = _fp8_rounded(blocks, extras)[0] if fp8 else blocks
    expected = run_chain(to(expect_blocks, "cuda"), x, passes=4)
    to(expect_blocks, "cpu")

    def streamed_run(probes=None):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        streamer = BlockStreamer(blocks, extras, torch.device("cuda"), [False] * 8, torch.float32, storage,
                                 passes=4, probes=probes)
        try:
            out = run_chain(blocks, x, passes=4)  # no synchronize between blocks: the host runs ahead
        finally:
            streamer.close()
        return out, streamer, torch.cuda.max_memory_reserved()

    calm, _, calm_reserved = streamed_run()
    slow = [b.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(3_000_000)) for b in blocks]
    trace = []
    try:
        got, streamer, reserved = streamed_run(StreamProbes(trace, copy_delay_cycles=2_000_000))
    finally:
        for h in slow:
            h.remove()
    for a, b, c in zip(got, calm, expected):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert streamer.buffers_per_size() == 2 and check_order(trace) == []
    assert reserved <= calm_reserved + 2 * 2**20, (reserved, calm_reserved)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_a_model_loaded_in_inference_mode_streams_and_keeps_its_kind(fp8):
    """ComfyUI loads and runs models under torch.inference_mode: their weights are inference tensors, and a
    parameter whose data changes kind fails when used. Buffers and views are made in the parameters' kind."""
    with torch.inference_mode():
        blocks, extras = chain()
        x = torch.randn(4, 32)
        expected = run_chain(_fp8_rounded(blocks, extras)[0] if fp8 else blocks, x, passes=2)
        for _ in range(2):  # the second run reuses the packs
            streamer = BlockStreamer(blocks, extras, torch.device("cpu"), [True, False, False, True, False, True],
                                     torch.float32, FP8 if fp8 else None, passes=2)
            try:
                got = run_chain(blocks, x, passes=2)
            finally:
                streamer.close()
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert all(p.is_inference() for p in weights(blocks, extras))


def test_a_failure_while_setting_up_restores_the_groups_already_set_up():
    blocks, extras = chain()
    with torch.inference_mode():
        odd = nn.Linear(32, 32)  # an inference tensor among normal ones: refused with a clear error
    blocks[4].layers[0] = odd
    before = snapshot([p for p in weights(blocks, extras) if p is not odd.weight and p is not odd.bias])
    with pytest.raises(RuntimeError, match="inference tensors"):
        BlockStreamer(blocks, extras, torch.device("cpu"), [False] * 6, torch.float32, FP8)
    assert unchanged(before)  # the four groups before it were set up (fp8 views) and are given back
    assert not any(m._forward_pre_hooks or m._forward_hooks for b in blocks for m in b.modules())
