"""Storyboard throughput: panels per minute drawn here without Ray and by 1 and 2 Ray actors on this machine's CPU
(tiny random models: it measures the machinery, not FLUX), then the paper estimate of a GPU cluster drawing a big
board.

    python benchmarks/storyboard_throughput.py                       # needs ray>=2.50 for the Ray rows
    python benchmarks/storyboard_throughput.py --panels 8 --candidates 2 --steps 2 --size 64
    python benchmarks/storyboard_throughput.py --estimate-only --step-seconds 0.17   # a step time you measured

Each measured row draws the same board (the panels, the candidates of each, the consistency score of every
candidate) with the models loaded once per process or actor. "load" is the time until every actor had its models
(the Ray rows start a local cluster on 127.0.0.1 first, not counted); panels/min counts from then to the last panel.
Rows use every CPU core: one process with all of them, one actor with all of them, two actors with half each. Each
row is run --repeat times (fresh actors each time) and the fastest run is shown: on a shared machine the others'
load only ever slows a run down, and the first run in a process also pays one-time costs (imports, kernels).

The estimate: per panel, candidates × steps × the time of one 1024² step; per actor, the model load once; the
panels spread evenly over the GPUs (Ray's pool hands each actor its next panel when it is free). The default step
time is DESIGN §6's figure (83.0 TFLOP per 1024² step with the adapter ≈ 84 ms at H100 bf16 peak): a floor, not a
measurement; the second line assumes 40 % of peak. VAE decode and scoring (well under a second per candidate) are
left out. Pass --step-seconds with a step time measured by benchmarks/memory_modes.py for a measured estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_STEP_SECONDS = 0.084  # DESIGN §6: 83.0 TFLOP per 1024² step with the adapter, at H100 bf16 peak
ASSUMED_UTILISATION = 0.40
# bf16 weights an actor reads once: FLUX.1-dev transformer 23.8 GB, T5-XXL 9.5, CLIP-L + VAE 0.4, adapter 5.6,
# SigLIP + DINOv2 3.1 (DESIGN §6 sizes); at an assumed 2 GB/s from a local NVMe disk
LOAD_GB, LOAD_GB_PER_S = 42.4, 2.0


def _board(args):
    from instantcharacter.run.settings import GenerationSettings
    from instantcharacter.run.storyboard import Board

    prompts = [f"the girl in scene {n}, detailed illustration" for n in range(1, args.panels + 1)]
    settings = GenerationSettings("", width=args.size, height=args.size, steps=args.steps, max_sequence_length=64)
    return Board(prompts, args.candidates, seed=1, settings=settings)


def _here(paths, board, character, threads):
    from instantcharacter.run.storyboard import BoardModels, render_panel

    torch.set_num_threads(threads)
    started = time.perf_counter()
    models = BoardModels.load(paths, torch.float32)
    ready = time.perf_counter()
    for number in range(1, board.panels + 1):
        render_panel(models, board, character, number)
    return ready - started, time.perf_counter() - ready


def _on_ray(paths, board, character, actors):
    from instantcharacter.run.storyboard_ray import BoardJob, panels_on_ray

    job = BoardJob({k: str(v) for k, v in paths.items()}, "fp32", board, character)
    started = time.perf_counter()
    ready = []
    done = list(panels_on_ray(job, range(1, board.panels + 1), actors=actors,
                              on_ready=lambda where: ready.append(time.perf_counter())))
    assert [p.number for p in done] == list(range(1, board.panels + 1))
    return ready[0] - started, time.perf_counter() - ready[0]


def measure(args) -> list[tuple[str, float, float]]:
    from PIL import Image

    from instantcharacter.files.encoder_files import load_reference_encoders
    from instantcharacter.testing.tiny import write_tiny_models

    board = _board(args)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tiny_models(Path(tmp) / "models")
        encoders = load_reference_encoders(paths["siglip"], paths["dinov2"], dtype=torch.float32)
        character = encoders.encode([Image.open(ROOT / "assets" / "reference_girl.png")])
        load, run = min((_here(paths, board, character, cores) for _ in range(args.repeat)), key=lambda r: r[1])
        rows.append((f"here, no Ray (1 process, {cores} threads)", load, run))
        try:
            import ray
        except ImportError:
            print('ray is not installed (pip install "ray>=2.50"): the Ray rows are skipped', file=sys.stderr)
            return rows
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the cluster on 127.0.0.1
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 runtime_env={"py_modules": [str(ROOT / "instantcharacter")], "excludes": ["__pycache__"]})
        try:
            for actors in (1, 2):
                load, run = min((_on_ray(paths, board, character, actors) for _ in range(args.repeat)),
                                key=lambda r: r[1])
                threads = cores // actors
                rows.append((f"Ray, {actors} actor{'s' * (actors > 1)} ({threads} thread{'s' * (threads > 1)} each)",
                             load, run))
        finally:
            ray.shutdown()
    return rows


def estimate(args) -> list[str]:
    load = LOAD_GB / LOAD_GB_PER_S
    per_gpu = -(-args.panels_estimate // args.gpus)
    lines = []
    source = ("measured (--step-seconds)" if args.step_seconds != PEAK_STEP_SECONDS else
              "DESIGN §6 at H100 peak, a floor")
    cases = [(args.step_seconds, source)]
    if args.step_seconds == PEAK_STEP_SECONDS:
        cases.append((PEAK_STEP_SECONDS / ASSUMED_UTILISATION, f"{ASSUMED_UTILISATION:.0%} of peak, assumed"))
    for step, why in cases:
        per_panel = args.candidates_estimate * args.steps_estimate * step
        wall = per_gpu * per_panel + load
        lines.append(f"| {args.gpus} GPUs, {args.panels_estimate:,} panels | {step * 1000:.0f} ms ({why}) | "
                     f"{args.candidates_estimate} × {args.steps_estimate} × {step:.3f} s = {per_panel:.1f} s | "
                     f"{per_gpu} × {per_panel:.1f} s + {load:.0f} s = {wall / 60:.1f} min | "
                     f"{args.panels_estimate / (wall / 60):,.0f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panels", type=int, default=6, help="panels of the measured board (default 6)")
    parser.add_argument("--candidates", type=int, default=2, help="candidates per panel, measured (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="steps per candidate, measured (default 2)")
    parser.add_argument("--size", type=int, default=64, help="panel side in pixels, measured (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row; the fastest is shown (default 3)")
    parser.add_argument("--estimate-only", action="store_true", help="print the cluster estimate only")
    parser.add_argument("--gpus", type=int, default=100)
    parser.add_argument("--panels-estimate", type=int, default=10_000)
    parser.add_argument("--candidates-estimate", type=int, default=4)
    parser.add_argument("--steps-estimate", type=int, default=28)
    parser.add_argument("--step-seconds", type=float, default=PEAK_STEP_SECONDS,
                        help=f"one 1024² step on one GPU (default {PEAK_STEP_SECONDS}: DESIGN §6 at H100 peak)")
    args = parser.parse_args()

    if not args.estimate_only:
        print(f"measured on this machine's CPU ({os.cpu_count()} cores), tiny random models: {args.panels} panels × "
              f"{args.candidates} candidates × {args.steps} steps at {args.size}², fastest of {args.repeat} runs\n")
        print("| how | load (s) | drawing (s) | panels/min |")
        print("|---|---|---|---|")
        for label, load, run in measure(args):
            print(f"| {label} | {load:.1f} | {run:.1f} | {args.panels / run * 60:.1f} |", flush=True)
        print()
    print("on paper: panels spread over the GPUs, one actor each; per actor the models load once "
          f"({LOAD_GB} GB of bf16 weights at an assumed {LOAD_GB_PER_S:.0f} GB/s)\n")
    print("| cluster | step at 1024² | per-panel GPU time | wall | panels/min |")
    print("|---|---|---|---|---|")
    for line in estimate(args):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
