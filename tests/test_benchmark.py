"""The memory benchmark's full-size build and its goal verdicts (the run itself needs a GPU; CI runs --small)."""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_modes", ROOT / "benchmarks" / "memory_modes.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)


def test_full_size_configs_build_the_published_models():
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model, SiglipVisionConfig,
                              SiglipVisionModel, T5Config, T5EncoderModel)

    from instantcharacter.model.adapter import InstantCharacterAdapter

    cfg = bench.configs(small=False)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**cfg["transformer"])
        models = {
            "transformer": transformer,
            "clip": CLIPTextModel(CLIPTextConfig(**cfg["clip"])),
            "t5": T5EncoderModel(T5Config(**cfg["t5"])),
            "vae": AutoencoderKL(**cfg["vae"]),
            "siglip": SiglipVisionModel(SiglipVisionConfig(**cfg["siglip"])),
            "dino": Dinov2Model(Dinov2Config(**cfg["dino"])),
            "adapter": InstantCharacterAdapter(cfg["projector"], 57, transformer.inner_dim),
        }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    # published sizes: FLUX.1-dev 11.9 B, CLIP-L text 123 M, T5-XXL encoder 4.76 B, FLUX VAE 84 M,
    # SigLIP so400m vision 428 M, DINOv2-giant 1.14 B, the adapter file 2,794,932,864
    expected = {"transformer": 11.90e9, "clip": 0.123e9, "t5": 4.762e9, "vae": 0.0838e9, "siglip": 0.428e9,
                "dino": 1.136e9}
    for name, value in expected.items():
        assert abs(counts[name] - value) / value < 0.005, (name, counts[name])
    assert counts["adapter"] == 2_794_932_864
    assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38


def test_full_size_plans_count_what_lives_on_the_device():
    """The residency plans of the published sizes (on ``meta``): what they put on the device fits the budget,
    streaming buffers (and fp8's compute-dtype copies) included."""
    from diffusers import FluxTransformer2DModel

    from instantcharacter.model.adapter import InstantCharacterAdapter
    from instantcharacter.run.offload.planner import GIB, PUBLISHED_SIZES, transformer_plan

    cfg = bench.configs(small=False)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**cfg["transformer"]).to(torch.bfloat16)
        adapter = InstantCharacterAdapter(cfg["projector"], 57, transformer.inner_dim).to(torch.bfloat16)
    plans = {(budget, fp8): transformer_plan(transformer, adapter, "budget", budget, fp8)
             for budget in (24.0, 16.0, 4.0) for fp8 in (False, True)}
    for (budget, fp8), plan in plans.items():
        if budget > 4:
            assert plan.total <= budget * GIB and 0 < sum(plan.resident), (budget, fp8)
    # fp8 at 16 GiB: the bf16 copies in flight do not fit beside all 57 fp8 blocks
    assert sum(plans[(16.0, True)].resident) < 57
    assert plans[(16.0, True)].in_flight > plans[(16.0, False)].in_flight / 2  # the compute-dtype copies count
    assert not any(plans[(4.0, False)].resident) and not any(plans[(4.0, True)].resident)
    assert plans[(4.0, False)].total < 6 * GIB and plans[(4.0, True)].total < 6 * GIB  # the streaming goals' room
    everything = transformer_plan(transformer, adapter, "budget", 0.0, False)
    assert abs(everything.in_flight - PUBLISHED_SIZES["in_flight"]) < 0.01 * everything.in_flight
    assert abs(everything.streamed_per_pass - PUBLISHED_SIZES["blocks"]) < 0.01 * everything.streamed_per_pass


def test_small_run_writes_its_table(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert bench.main(["--small", "--modes", "budget16,stream-fp8", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out.read_text(encoding="utf-8")
    rows = [line for line in report.splitlines() if line.startswith("| budget")]
    assert len(rows) == 2 and all(row in printed for row in rows)
    assert "blocks resident" in rows[0] and "+ fp8 storage" in rows[1]


def test_goal_verdicts():
    assert bench.goal("resident", 30.0, 0.50, None, None, 0.47, None).startswith("✅")
    assert bench.goal("resident", 33.0, 0.50, None, None, 0.47, None).startswith("❌")  # too much memory
    assert bench.goal("budget16", 14.8, 0.55, None, None, None, 0.50).startswith("❌")  # over 14.5 GiB
    assert bench.goal("budget16", 14.0, 0.70, None, None, None, 0.50).startswith("❌")  # 1.4 × resident
    assert bench.goal("stream", 5.0, 0.6, 40e9, 50e9, None, None).startswith("❌")  # 80 % of the bandwidth
    assert bench.goal("stream", 5.0, 0.6, 45e9, 50e9, None, None).startswith("✅")
    assert bench.goal("stream-fp8", 5.5, 0.29, None, None, None, None).startswith("✅")
    assert not bench.goal("budget24", None, 0.5, None, None, None, 0.5).startswith(("✅", "❌"))  # no GPU, no verdict
    assert bench.goal("sequential", 3.0, 2.0, None, None, None, None) == ""
