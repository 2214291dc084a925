"""Peak VRAM and step time of each offload mode, on the full-size architecture with random weights.

    python benchmarks/memory_modes.py              # FLUX.1-dev + adapter at 1024², on the GPU
    python benchmarks/memory_modes.py --small      # a scaled-down config on the CPU, in seconds (CI smoke check)

Nothing is downloaded: the FLUX.1-dev transformer and the InstantCharacter adapter are built at their
published sizes with random weights. The text encoders, image encoders and VAE run once per image and
leave the GPU in every mode but ``off``; this script times the denoising steps, where the modes differ.
It first measures pinned host→device bandwidth, then for each mode: peak VRAM (allocated / reserved),
seconds per step, the ratio to the all-resident step, and the transfer rate achieved while streaming.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instantcharacter.adapter import InstantCharacterAdapter, attach  # noqa: E402
from instantcharacter.memory import Placement  # noqa: E402
from instantcharacter.projector import PUBLISHED_PROJECTOR, ProjectorConfig  # noqa: E402

GIB = 2**30


def build(small: bool, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    if small:
        t_cfg = dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=2,
                     joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True)
        p_cfg = ProjectorConfig(feature_dim=128, num_blocks=1, ff_inner_dim=256, mlp_hidden_dim=256,
                                resampler_dim=128, resampler_depth=1, resampler_ff_dim=256, num_queries=32,
                                token_dim=64)
    else:
        t_cfg = dict(guidance_embeds=True)  # diffusers' defaults are FLUX.1-dev's sizes
        p_cfg = PUBLISHED_PROJECTOR
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**t_cfg)
        adapter = InstantCharacterAdapter(p_cfg, t_cfg.get("num_layers", 19) + t_cfg.get("num_single_layers", 38),
                                          transformer.inner_dim)
    g = torch.Generator().manual_seed(0)
    for module in (transformer, adapter):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02 if p.ndim > 1 else
                        torch.ones(p.shape))
        module.to(dtype).eval().requires_grad_(False)
    flux = SimpleNamespace(transformer=transformer, text_encoder=None, text_encoder_2=None, vae=None)
    return flux, adapter


def bandwidth(device) -> float | None:
    if device.type != "cuda":
        return None
    host = torch.empty(1 * GIB, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * GIB / (time.perf_counter() - start)


def run_mode(flux, adapter, device, mode, budget, fp8, size, steps, with_adapter=True):
    t = flux.transformer
    cfg = t.config
    side = size // 16
    batch, text_len = 1, 512 if size >= 512 else 32
    g = torch.Generator().manual_seed(1)
    dtype = t.dtype
    latents = torch.randn(batch, side * side, cfg.in_channels, generator=g).to(device, dtype)
    embeds = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype)
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    ids, txt_ids = ids.to(device), torch.zeros(text_len, 3, device=device)
    tokens = torch.randn(1, adapter.image_proj.config.num_queries, adapter.image_proj.config.token_dim,
                         generator=g).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    placement = Placement(flux, adapter if with_adapter else None, mode, device, budget_gb=budget, fp8=fp8)
    attachment = None
    times = []
    try:
        if with_adapter:
            attachment = attach(t, adapter)
            attachment.context.tokens, attachment.context.scale = tokens, 0.9
            attachment.context.image_seq_len = side * side
        with placement.transformer(), torch.inference_mode():
            for i in range(steps + 1):  # the first step warms up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                t(hidden_states=latents, timestep=torch.full([batch], 0.5, device=device, dtype=dtype),
                  guidance=torch.full([batch], 3.5, device=device), pooled_projections=pooled,
                  encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=ids, return_dict=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
            moved = placement.streamer.bytes_moved if placement.streamer else 0
    finally:
        if attachment:
            attachment.detach()
        placement.restore()
    step = sum(times) / len(times)
    peak = (torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB) \
        if device.type == "cuda" else (None, None)
    rate = moved / (steps + 1) / step if moved else None
    return step, peak, rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="scaled-down config on the CPU (smoke check)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 5, --small 2)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024, --small 128)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    if not args.small and device.type != "cuda":
        print("No CUDA GPU: run with --small for the CPU smoke check.")
        return 2
    steps = args.steps or (2 if args.small else 5)
    size = args.size or (128 if args.small else 1024)
    dtype = torch.float32 if args.small else torch.bfloat16
    flux, adapter = build(args.small, dtype)
    bw = bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; pinned host→device: {f'{bw / 1e9:.1f} GB/s' if bw else 'n/a (no CUDA)'}; "
          f"{size}², {steps} timed steps per mode, {'scaled-down' if args.small else 'full-size'} random weights")
    total = sum(p.numel() * p.element_size() for m in (flux.transformer, adapter) for p in m.parameters())
    small_budgets = [total / GIB * 0.6 + 3.0, total / GIB * 0.3 + 3.0]
    modes = [("plain FLUX (no adapter), resident", "off", None, False, False),
             ("resident", "off", None, False, True),
             ("budget 24 GB" if not args.small else f"budget {small_budgets[0]:.2f} GB", "budget",
              24.0 if not args.small else small_budgets[0], False, True),
             ("budget 16 GB" if not args.small else f"budget {small_budgets[1]:.2f} GB", "budget",
              16.0 if not args.small else small_budgets[1], False, True),
             ("full streaming bf16", "budget", 0.0 + 3.0 + 0.01, False, True),
             ("full streaming fp8 storage", "budget", 0.0 + 3.0 + 0.01, True, True),
             ("sequential (no prefetch)", "sequential", None, False, True)]
    print("\n| mode | peak alloc GB | peak reserved GB | s/step | × resident | transfer GB/s | % of bandwidth |")
    print("|---|---|---|---|---|---|---|")
    resident_step = None
    for label, mode, budget, fp8, with_adapter in modes:
        step, (alloc, reserved), rate = run_mode(flux, adapter, device, mode, budget, fp8, size, steps, with_adapter)
        if label == "resident":
            resident_step = step
        ratio = f"{step / resident_step:.2f}" if resident_step else "—"
        fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
        pct = f"{100 * rate / bw:.0f}" if rate and bw else "n/a"
        print(f"| {label} | {fmt(alloc)} | {fmt(reserved)} | {step:.3f} | {ratio} | "
              f"{fmt(rate / 1e9 if rate else None)} | {pct} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
