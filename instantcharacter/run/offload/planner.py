"""The offload planner: every byte count and every choice of a placement, and nothing that moves memory.

Which blocks stay on the device under a VRAM budget (spread through the sequence, so each streamed block's copy
overlaps the compute of the kept blocks before it), how many bytes each phase puts on the device (the kept
groups, the streaming buffers, the rest of the model, a reserve for working memory), what the published models
need, and which mode ``auto`` picks. All of it works on models on the ``meta`` device (the README's figures are
this arithmetic for the published sizes).

Every memory figure here is in GiB (2**30 bytes, what nvidia-smi and ComfyUI call "GB"; a "24 GB" card has 24
GiB), ``vram_budget_gb`` too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ...files.checkpoint import FP8
from .layout import ALIGN, Layout, group_layouts

OFFLOAD_MODES = ("auto", "off", "budget", "sequential")
GIB = 2**30
MIB = 2**20
# Working memory kept free for activations, attention and the allocator at 1024² (an estimate; the
# benchmark script measures the real peak of each phase).
ACTIVATION_RESERVE_GIB = 3.0
# T5's working memory for one 512-token prompt is tens of MB; this leaves room for the allocator too.
TEXT_MARGIN_GIB = 0.5
# What the published models need on the device (bytes), for ``doctor`` without loading them: FLUX.1-dev's blocks
# with the 57 character layers, the rest of the transformer, CLIP-L + T5-XXL, the VAE, the projector, and the
# streaming buffers when every block streams (two of a double block + its layer, two of a single + its layer).
PUBLISHED_SIZES = {"blocks": int(23.8e9 + 2.87e9), "transformer_rest": int(0.2e9), "text_encoders": int(9.8e9),
                   "vae": int(0.17e9), "projector": int(2.72e9), "in_flight": int(2.03e9)}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # the FLUX transformer's children that hold blocks


def transformer_blocks(transformer) -> list:
    """The FLUX transformer's blocks in running order: the double-stream ones, then the single-stream ones."""
    return [block for name in BLOCK_LISTS for block in getattr(transformer, name)]


def outside_blocks(transformer) -> list:
    """The FLUX transformer's modules that are in no block (embedders, final norm and projection)."""
    return [module for name, module in transformer.named_children() if name not in BLOCK_LISTS]


def text_encoders(flux) -> list:
    """CLIP and T5, those the pipeline has."""
    return [m for m in (flux.text_encoder, flux.text_encoder_2) if m is not None]


def t5_blocks(flux) -> list:
    """T5's blocks (those that stream when T5 does not fit); none when the pipeline has no T5 built that way."""
    return list(getattr(getattr(flux.text_encoder_2, "encoder", None), "block", None) or [])


def module_bytes(modules, dtype: torch.dtype | None = None) -> int:
    total = 0
    for m in modules:
        for p in m.parameters():
            size = torch.empty((), dtype=dtype).element_size() if dtype is not None else p.element_size()
            total += p.numel() * size
    return total


def device_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator reserves for one tensor of ``nbytes``: large ones are rounded up to
    2 MiB, small ones to 512 bytes (an upper bound; small ones share 2 MiB segments)."""
    if nbytes > MIB:
        return -(-nbytes // (2 * MIB)) * 2 * MIB
    return -(-nbytes // ALIGN) * ALIGN


def plan_residency(group_bytes: list[int], budget_bytes: float, in_flight=None) -> list[bool]:
    """Which groups stay on the device: as many bytes as the budget holds, with the streamed ones spread evenly
    through the sequence, so that each streamed block's copy overlaps the compute of the resident blocks before it.
    FLUX's blocks differ in size (a double block is about twice a single one), so the count alone does not
    decide: the resident bytes must fit. ``in_flight(resident)``: the bytes the plan needs on the device besides
    the kept groups (the streaming buffers, two of each streamed size); when nothing fits, everything streams.

    Streaming blocks of one size only can need fewer buffers (and so stream fewer bytes) than streaming a mix;
    that plan is taken only when it streams clearly less (by more than one group's bytes)."""
    n = len(group_bytes)
    extra = in_flight or (lambda resident: 0)

    def fits(resident):
        return sum(b for b, keep in zip(group_bytes, resident) if keep) + extra(resident) <= budget_bytes

    if fits([True] * n):
        return [True] * n
    candidates = []  # (streamed bytes, spread through all groups, residency)
    for pool_index, pool in enumerate(streaming_choices(group_bytes)):
        for resident in pool:  # fewest streamed first
            if fits(resident):
                candidates.append((sum(b for b, keep in zip(group_bytes, resident) if not keep), pool_index == 0,
                                   resident))
                break
    if not candidates:
        return [False] * n
    least = min(c[0] for c in candidates)
    spread = [c for c in candidates if c[1] and c[0] <= least + max(group_bytes)]
    return spread[0][2] if spread else min(candidates, key=lambda c: c[0])[2]


def streaming_choices(group_bytes: list[int]) -> list[list[list[bool]]]:
    """The residencies a plan chooses from, by pool: streamed groups spread through all groups, then (when the
    sizes differ) through the groups of one size only; in each pool with 1, 2, … streamed."""
    n = len(group_bytes)
    sizes = sorted(set(group_bytes))
    pools = [list(range(n))] + ([[i for i in range(n) if group_bytes[i] == s] for s in sizes] if len(sizes) > 1
                                else [])
    out = []
    for positions in pools:
        choices = []
        for streamed in range(1, len(positions) + 1):
            resident = [True] * n
            for i, keep in zip(positions, _spread_out(len(positions), streamed)):
                resident[i] = keep
            choices.append(resident)
        out.append(choices)
    return out


def _spread_out(n: int, streamed: int) -> list[bool]:
    """Residency with ``streamed`` of ``n`` positions streamed, evenly spaced (Bresenham)."""
    marks = [False] * n
    for k in range(streamed):
        marks[min(n - 1, (k * n + n // 2) // streamed)] = True
    i = 0
    while sum(marks) < streamed:  # rounding collisions
        marks[i] = True
        i += 1
    return [not m for m in marks]


def buffer_keys(layouts: list, streamed: bool) -> list[tuple]:
    """The device buffers one group holds while it runs: (role, bytes, inference tensor) per streamed part and per
    cast part. ``layouts``: the parts' layouts, or (layout, inference tensors) pairs."""
    keys = []
    for item in layouts:
        lay, inference = item if isinstance(item, tuple) else (item, False)
        if streamed:
            keys.append(("stored", lay.nbytes, inference))
        if lay.cast_nbytes:
            keys.append(("compute", lay.compute_nbytes, inference))
    return keys


def buffer_limits(groups: list[tuple[list[Layout], bool]], prefetch: bool) -> dict[tuple, int]:
    """How many device buffers of each key a run makes at most (``groups``: layouts, streamed)."""
    most: Counter = Counter()
    for layouts, streamed in groups:
        for key, count in Counter(buffer_keys(layouts, streamed)).items():
            most[key] = max(most[key], count)
    return {key: (2 if prefetch else 1) * count for key, count in most.items()}


@dataclass
class OffloadChoice:
    mode: str
    budget_gb: float | None
    reason: str


@dataclass
class Plan:
    """What one phase puts on the device (bytes): the groups kept there, the streaming buffers, what else the
    phase holds (the rest of the model) and the reserve for its working memory."""

    resident: list[bool]
    kept: int
    in_flight: int
    rest: int
    reserve: int
    streamed_per_pass: int

    @property
    def total(self) -> int:
        return self.kept + self.in_flight + self.rest + self.reserve


def group_costs(layouts, prefetch: bool):
    """Per group the bytes it holds on the device when kept; and the streaming buffers a residency needs: of each
    size, two (one with no prefetch) for the streamed parts, and as many compute-dtype buffers for the cast ones."""
    kept = [sum(device_bytes(lay.nbytes) for lay in group) for group in layouts]

    def in_flight(resident) -> int:
        limits = buffer_limits([(group, not keep) for group, keep in zip(layouts, resident)], prefetch)
        return sum(count * device_bytes(key[1]) for key, count in limits.items())

    return kept, in_flight


def plan_groups(layouts, mode: str, budget_bytes: float | None, fixed: int, reserve: int, prefetch: bool) -> Plan:
    kept, in_flight = group_costs(layouts, prefetch)
    if mode == "off":
        resident = [True] * len(layouts)
    elif mode == "sequential" or budget_bytes is None:
        resident = [False] * len(layouts)
    else:
        resident = plan_residency(kept, budget_bytes - fixed - reserve, in_flight)
    streamed = sum(lay.nbytes for group, keep in zip(layouts, resident) if not keep for lay in group)
    return Plan(resident, sum(k for k, keep in zip(kept, resident) if keep), in_flight(resident), fixed, reserve,
                streamed)


def transformer_groups(transformer, adapter):
    """The transformer's blocks in running order, each with the character layer that runs inside it."""
    blocks = transformer_blocks(transformer)
    layers = list(adapter.ip_adapter) if adapter is not None else []
    extras = [[layers[i]] if i < len(layers) else [] for i in range(len(blocks))]
    return blocks, extras


def transformer_plan(transformer, adapter, mode: str, budget_gb: float | None, fp8: bool) -> Plan:
    """The residency plan of the denoising phase (works on ``meta`` models: the README's figures)."""
    blocks, extras = transformer_groups(transformer, adapter)
    layouts = [group_layouts([b, *e], FP8 if fp8 else None, transformer.dtype) for b, e in zip(blocks, extras)]
    rest = module_bytes(outside_blocks(transformer))
    budget = None if budget_gb is None else budget_gb * GIB
    return plan_groups(layouts, mode, budget, rest, int(ACTIVATION_RESERVE_GIB * GIB), prefetch=mode != "sequential")


def text_encoder_plan(flux, mode: str, budget_gb: float | None) -> Plan | None:
    """T5's plan in the prompt-encoding phase; None when the text encoders move whole (or not at all). T5-XXL alone
    is 9.5 GB in bf16, more than small budgets hold: then its blocks stream like the transformer's (in
    ``sequential`` always, one at a time)."""
    encoders, blocks = text_encoders(flux), t5_blocks(flux)
    margin = int(TEXT_MARGIN_GIB * GIB)
    fits = mode == "budget" and module_bytes(encoders) + margin <= budget_gb * GIB
    if mode == "off" or not blocks or fits:
        return None
    rest = module_bytes(encoders) - module_bytes(blocks)
    layouts = [group_layouts([b], None, None) for b in blocks]
    budget = budget_gb * GIB if mode == "budget" else None
    return plan_groups(layouts, mode, budget, rest, margin, prefetch=mode != "sequential")


def partial_budgets(transformer, adapter, fp8: bool = False) -> list[tuple[float, list[bool]]]:
    """Budgets (GiB) at which the denoising plan keeps some blocks and streams the others, each with its
    residency, fewest resident first (a small model's budgets for tests and the benchmark's ``--small``)."""
    blocks, extras = transformer_groups(transformer, adapter)
    layouts = [group_layouts([b, *e], FP8 if fp8 else None, transformer.dtype) for b, e in zip(blocks, extras)]
    kept, in_flight = group_costs(layouts, prefetch=True)
    base = transformer_plan(transformer, adapter, "budget", 0.0, fp8)
    out = {}
    for resident in (r for pool in streaming_choices(kept) for r in pool):
        cost = base.rest + base.reserve + sum(k for k, keep in zip(kept, resident) if keep) + in_flight(resident)
        plan = transformer_plan(transformer, adapter, "budget", cost / GIB, fp8)
        if 0 < sum(plan.resident) < len(plan.resident):
            out[tuple(plan.resident)] = min(out.get(tuple(plan.resident), cost / GIB), cost / GIB)
    return sorted(((budget, list(r)) for r, budget in out.items()), key=lambda item: sum(item[1]))


def model_sizes(flux, adapter, fp8: bool = False) -> dict[str, int]:
    """Bytes of each component as it would sit on the device; ``in_flight``: the streaming buffers when every
    transformer block streams."""
    t = flux.transformer
    store = FP8 if fp8 else None
    ip = list(adapter.ip_adapter) if adapter is not None else []
    streaming = transformer_plan(t, adapter, "budget", 0.0, fp8)
    return {
        "blocks": module_bytes(transformer_blocks(t), store) + module_bytes(ip, store),
        "transformer_rest": module_bytes(outside_blocks(t)),
        "text_encoders": module_bytes(text_encoders(flux)),
        "vae": module_bytes([flux.vae] if flux.vae is not None else []),
        "projector": module_bytes([adapter.image_proj]) if adapter is not None else 0,
        "in_flight": streaming.in_flight,
    }


def choose_offload(free_bytes: int, sizes: dict[str, int]) -> OffloadChoice:
    """``auto``: everything resident if it all fits, else a budget for the transformer, else sequential."""
    reserve = ACTIVATION_RESERVE_GIB * GIB
    everything = sum(v for k, v in sizes.items() if k != "in_flight") + reserve
    if free_bytes >= everything:
        return OffloadChoice("off", None, f"{free_bytes / GIB:.1f} GiB free ≥ {everything / GIB:.1f} GiB for all models")
    # T5 streams its blocks and the VAE decodes in tiles when they do not fit; the projector visits whole
    phase_peak = max(sizes["vae"], sizes["projector"], sizes["transformer_rest"] + sizes["in_flight"])
    if free_bytes >= phase_peak + reserve + GIB:
        budget = (free_bytes - 0.5 * GIB) / GIB
        return OffloadChoice("budget", budget, f"{free_bytes / GIB:.1f} GiB free: budget {budget:.1f} GiB, the "
                                               "transformer blocks that do not fit are streamed")
    return OffloadChoice("sequential", None, f"only {free_bytes / GIB:.1f} GiB free: blocks one at a time")


def vae_decode_bytes(latent_h: int, latent_w: int, dtype: torch.dtype) -> int:
    """Working memory of decoding one image with the FLUX VAE. This is ComfyUI's estimate for this VAE
    (``memory_used_decode`` in comfy/sd.py): deliberately on the safe side."""
    return 2178 * 64 * latent_h * latent_w * torch.empty((), dtype=dtype).element_size()


def decode_plan(vae, mode: str, budget_gb: float | None, latent_h: int, latent_w: int, dtype: torch.dtype) -> str:
    """How the VAE decodes: ``batch`` (all images at once), ``per_image``, or ``tiled`` (per image, in overlapping
    tiles). ``off`` is about speed; the offloading modes decode one image at a time, tiled when the VAE and one
    image's decode would not fit the budget (always in ``sequential``). The transformer's device copies are gone
    by then (the streamer releases them when the denoising phase ends)."""
    if mode == "off":
        return "batch"
    if mode == "sequential":
        return "tiled"
    need = (module_bytes([vae]) if vae is not None else 0) + vae_decode_bytes(latent_h, latent_w, dtype)
    return "per_image" if need + GIB // 2 <= budget_gb * GIB else "tiled"


def recommend_offload(free_bytes: int | None) -> tuple[str, str]:
    """The offload mode for a machine with ``free_bytes`` of free VRAM (None: no CUDA GPU) and why, from the
    published model sizes (for ``doctor``)."""
    if free_bytes is None:
        return "off", "no CUDA GPU: everything runs on the CPU, nothing to offload"
    choice = choose_offload(free_bytes, PUBLISHED_SIZES)
    if choice.mode == "budget":
        return f"budget {choice.budget_gb:.0f} GiB", choice.reason
    return choice.mode, choice.reason

