"""What the character costs on the native path: ComfyUI's own FLUX model called with and without Apply.

    COMFYUI_DIR=../shared/comfyui/v0.33.0 python benchmarks/native_overhead.py            # full width, on the GPU
    COMFYUI_DIR=... python benchmarks/native_overhead.py --blocks 4 8 --sizes 1024        # fewer blocks
    COMFYUI_DIR=... python benchmarks/native_overhead.py --small                          # tiny, CPU, seconds (CI)

Nothing is downloaded. ComfyUI's FLUX (comfy.supported_models.Flux → comfy.model_base.Flux, its own layers) is
built at FLUX.1-dev's width with random weights, by default with all 19 + 38 blocks (``--blocks D S`` for
fewer), and the InstantCharacter adapter at its published size for those layers; the character is added by
the Apply node itself. Each row times model calls as a sampler makes them (``BaseModel.apply_model`` with the
MODEL's patches and wrappers, one new sigma per call, as one step of a CFG-1 sampler), plain and patched, on
the same inputs. The FLOP columns come from PyTorch's FLOP counter over one such call (at a new sigma, so
the patched call includes the per-step resampler; the timestep-free projector part runs once per run and is
not in it): "floor" is patched / plain FLOPs, the ratio a perfect implementation would show. With a second
device (``--small`` stands one in on the CPU: it shows the path runs, not a speed-up) it also times a short
KSampler run at CFG 2 through MultiGPU CFG Split, plain and patched.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACK = "instantcharacter_pack_bench"

ALL_DEVICES = "get_all_torch_devices"
FULL = dict(hidden=3072, heads=24, double=19, single=38, context=4096, vec=768)
SMALL = dict(hidden=256, heads=2, double=2, single=2, context=32, vec=32)


def import_comfyui(folder: str | None, cpu: bool):
    folder = folder or os.environ.get("COMFYUI_DIR")
    if not folder or not (Path(folder) / "main.py").is_file():
        sys.exit("Set COMFYUI_DIR (or --comfyui) to a ComfyUI source tree, e.g. ../shared/comfyui/v0.33.0.")
    sys.path.insert(0, str(Path(folder).resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu  # as main.py --cpu; must precede comfy.model_management
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfyui_version

    return getattr(comfyui_version, "__version__", "?")


def import_pack():
    """The pack as ComfyUI imports a custom node."""
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.nodes.apply")


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Small random weights on the module's own device (fast on a GPU); norm scales 1, biases 0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.0 if name.endswith("latents") else 0.02)
            elif "norm" in name or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()


def flux_patcher(sizes: dict, dtype, device, seed: int = 0):
    """A FLUX MODEL as ComfyUI makes it, at ``sizes``, random weights, on ``device``."""
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams

    unet = dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, patch_size=2,
                vec_in_dim=sizes["vec"], context_in_dim=sizes["context"], hidden_size=sizes["hidden"],
                mlp_ratio=4.0, num_heads=sizes["heads"], depth=sizes["double"], depth_single_blocks=sizes["single"],
                axes_dim=[16, 56, 56] if sizes["hidden"] == 3072 else [32, 48, 48],  # heads of 128
                theta=10000, qkv_bias=True, txt_ids_dims=[])
    fields = FluxParams.__dataclass_fields__
    config = comfy.supported_models.Flux({k: v for k, v in unet.items() if k in fields or k in ("image_model",
                                                                                                 "guidance_embed")})
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, "", device=device)
    randomize_(base.diffusion_model, seed)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    # ComfyUI's multi-GPU copies are made by a reload factory, as UNETLoader registers one: here, the same build
    patcher.cached_patcher_init = (rebuild_flux, (sizes, dtype, device, seed))
    return patcher


def rebuild_flux(sizes, dtype, device, seed, disable_dynamic=False):
    return flux_patcher(sizes, dtype, device, seed)


def rebuild_adapter(sizes, dtype, device, seed, disable_dynamic=False):
    """The adapter's reload factory for ComfyUI's multi-GPU copies (the pack's own loads from the adapter's file;
    this one has none)."""
    memory = importlib.import_module(f"{PACK}.nodes.adapter_patcher")
    adapter = adapter_model(sizes, dtype, device, seed)
    memory.make_comfy_managed(adapter)
    patcher = memory._core_patcher(adapter, disable_dynamic)
    patcher.cached_patcher_init = (rebuild_adapter, (sizes, dtype, device, seed))
    return patcher


def adapter_model(sizes: dict, dtype, device, seed: int = 1):
    from instantcharacter.model.adapter import InstantCharacterAdapter
    from instantcharacter.model.projector import PUBLISHED_PROJECTOR
    from instantcharacter.testing.tiny import tiny_adapter_config

    if sizes["hidden"] == FULL["hidden"]:
        projector = PUBLISHED_PROJECTOR
    else:
        import dataclasses

        projector = dataclasses.replace(tiny_adapter_config(), token_dim=sizes["context"])
    with torch.device(device):
        adapter = InstantCharacterAdapter(projector, sizes["double"] + sizes["single"], sizes["hidden"])
    randomize_(adapter, seed)
    return adapter.to(dtype).eval().requires_grad_(False)


def random_features(adapter, device, dtype):
    from instantcharacter.reference.character import ReferenceFeatures

    width = adapter.image_proj.config.feature_dim
    g = torch.Generator(device="cpu").manual_seed(5)
    shapes = [(1, 3 * 729, width), (1, 729, width), (1, 4 * 729, width)]
    return ReferenceFeatures(*(torch.randn(s, generator=g).to(device, dtype) for s in shapes))


class Caller:
    """Model calls as a sampler makes them, one new sigma per call."""

    def __init__(self, patcher, side: int, batch: int, sizes: dict, device, dtype, text_len: int):
        import comfy.patcher_extension as ext

        self.patcher = patcher
        g = torch.Generator(device="cpu").manual_seed(3)
        self.x = torch.randn(batch, 16, side // 8, side // 8, generator=g).to(device)
        self.context = torch.randn(batch, text_len, sizes["context"], generator=g).to(device, dtype)
        self.pooled = torch.randn(batch, sizes["vec"], generator=g).to(device, dtype)
        self.guidance = torch.full([batch], 3.5, device=device)
        self.options = ext.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
        self.options["wrappers"] = ext.copy_nested_dicts(patcher.wrappers)
        self.options["cond_or_uncond"] = [0]
        self.calls = 0

    def __call__(self):
        sigma = 0.95 - 0.9 * ((self.calls * 0.618) % 1.0)  # a new sigma every call
        self.calls += 1
        t = torch.full([self.x.shape[0]], sigma, device=self.x.device)
        options = dict(self.options, sigmas=t)
        with torch.inference_mode():
            return self.patcher.model.apply_model(self.x, t, c_crossattn=self.context, y=self.pooled,
                                                  guidance=self.guidance, transformer_options=options)


def seconds_per_call(call, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    call()  # the run's timestep-free projector part, once
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def loaded(patcher):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher] + patcher.get_nested_additional_models())
    patcher.pre_run()  # as a sampler does: the model knows its patcher (the APPLY_MODEL wrapper reads it)
    return patcher


def cfg_split_rows(apply, plain, adapter, features, sizes, device, steps: int, side: int, stand_in: bool):
    """A short KSampler run at CFG 2, plain and patched, on one device and through MultiGPU CFG Split."""
    import comfy.model_management as mm
    import comfy.sample

    try:
        multigpu = importlib.import_module("comfy_extras.nodes_multigpu")
    except ImportError:
        return ["| CFG split | — | this ComfyUI has no MultiGPU CFG Split (v0.22+) |"]
    if stand_in:  # ComfyUI's device list, named as a string: it exists only where the multi-GPU nodes do (v0.22+)
        setattr(mm, ALL_DEVICES, lambda exclude_current=False: [torch.device("cpu"), torch.device("cpu", 1)])
    elif torch.cuda.device_count() < 2:
        return ["| CFG split | — | one device: not measured |"]

    def sample(model):
        latent = torch.zeros(1, 16, side // 8, side // 8)
        noise = comfy.sample.prepare_noise(latent, 7)
        g = torch.Generator().manual_seed(1)
        cond = [[torch.randn(1, 16, sizes["context"], generator=g), {"pooled_output": torch.randn(1, sizes["vec"], generator=g), "guidance": 3.5}]]
        neg = [[torch.randn(1, 16, sizes["context"], generator=g), {"pooled_output": torch.randn(1, sizes["vec"], generator=g), "guidance": 3.5}]]
        t0 = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", cond, neg, latent, denoise=1.0,
                                disable_pbar=True, seed=7)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    def split(model):
        out = multigpu.MultiGPUCFGSplitNode.execute(model, 2)
        return out.args[0] if hasattr(out, "args") else out[0]

    patched = apply(plain, adapter, features)
    rows = []
    for label, model in (("one device, plain", plain), ("one device, with character", patched),
                         ("CFG split, plain", split(plain)), ("CFG split, with character", split(patched))):
        sample(model)  # loads (and on the split, makes the second device's copies)
        rows.append(f"| {label} | {sample(model) * 1000:.1f} ms/step |")
    mm.unload_all_models()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (seconds): a smoke check")
    parser.add_argument("--comfyui", help="a ComfyUI source tree (default: $COMFYUI_DIR)")
    parser.add_argument("--blocks", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"),
                        help="FLUX blocks (default: all 19 38; --small: 2 2)")
    parser.add_argument("--sizes", nargs="+", type=int, help="picture sides (default 512 1024; --small: 64)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="batch sizes (default 1 4)")
    parser.add_argument("--repeats", type=int, help="timed calls per row (median; default 10, --small 2)")
    parser.add_argument("--steps", type=int, default=4, help="steps of the CFG-split runs (default 4)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda") if cuda else torch.device("cpu")
    version = import_comfyui(args.comfyui, cpu=not cuda)
    native = import_pack()
    sizes = dict(SMALL if args.small else FULL)
    if args.blocks:
        sizes.update(double=args.blocks[0], single=args.blocks[1])
    sides = args.sizes or ([64] if args.small else [512, 1024])
    repeats = args.repeats or (3 if args.small else 10)
    dtype = torch.float32 if args.small else torch.bfloat16
    text_len = 16 if args.small else 512
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    where = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    say(f"# Native path overhead — {where}, torch {torch.__version__}, ComfyUI {version}, "
        f"{time.strftime('%Y-%m-%d')}")
    say(f"FLUX width {sizes['hidden']}, {sizes['double']}+{sizes['single']} blocks, {dtype}, text {text_len} tokens; "
        f"median of {repeats} calls")
    say()
    plain = loaded(flux_patcher(sizes, dtype, device))
    adapter = adapter_model(sizes, dtype, device)
    features = random_features(adapter, device, dtype)

    def apply(model, adapter, features):
        out = native.ApplyToModel.execute(model, adapter, features, 0.9, 0.0, 1.0, True)
        return out.args[0] if hasattr(out, "args") else out[0]

    patched = loaded(apply(plain, adapter, features))
    memory = importlib.import_module(f"{PACK}.nodes.adapter_patcher")
    memory.adapter_patcher(adapter).cached_patcher_init = (rebuild_adapter, (sizes, dtype, device, 1))
    say("| size | batch | plain ms/call | with character ms/call | measured ratio | FLOP floor | goal (DESIGN §6) |")
    say("|---|---|---|---|---|---|---|")
    for side in sides:
        for batch in args.batches:
            calls = [Caller(m, side, batch, sizes, device, dtype, text_len) for m in (plain, patched)]
            floor = flops(calls[1]) / flops(calls[0])
            t_plain, t_patched = (seconds_per_call(c, device, repeats) for c in calls)
            goal = "≤ 1.10" if batch == 1 else "≤ 1.06"
            say(f"| {side}² | {batch} | {t_plain * 1000:.1f} | {t_patched * 1000:.1f} | {t_patched / t_plain:.3f} | "
                f"{floor:.3f} | {goal} |")
    say()
    say("| MultiGPU CFG Split (KSampler, CFG 2, euler) | time |")
    say("|---|---|")
    for row in cfg_split_rows(apply, plain, adapter, features, sizes, device, args.steps, sides[0],
                              stand_in=args.small):
        say(row)
    if args.small:
        say("(--small: the second device is a CPU stand-in sharing the same cores; the split shows the path runs)")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
