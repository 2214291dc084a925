"""Peak VRAM of each phase and step time of each offload mode: whole generations on the full-size architecture.

    python benchmarks/memory_modes.py                 # full size at 1024², 8 steps, on the GPU (< 6 min on an H200)
    python benchmarks/memory_modes.py --modes resident,stream-fp8 --steps 28 --out table.md
    python benchmarks/memory_modes.py --small         # tiny widths on the CPU, in seconds (CI smoke check)

Nothing is downloaded. Every model is built at its published size with random weights (FLUX.1-dev
transformer, CLIP-L, T5-XXL, the FLUX VAE, SigLIP so400m, DINOv2-giant, the InstantCharacter adapter),
initialised on the GPU (fast) and kept in host memory, as the model cache keeps them. Each row is one
``pipeline.generate`` call, as the sampler makes it (prompt encoding, character tokens, the denoising steps,
VAE decode), starting with every model on the host; the Encode Reference row is the node's own device round
trip. The script first measures page-locked host→device bandwidth, then prints a markdown table row by row
(and writes it to ``--out``).

Memory is GiB (2**30 bytes) everywhere. For each phase (text encoders, projector, denoising, decode) the table
gives PyTorch's peak allocated / peak reserved memory; "peak reserved" is the whole call's, with the phase that
set it (reserved is what runs a card out of memory; the CUDA context, ~0.5 GiB, comes on top). Step times come
from CUDA events recorded by the step callback (nothing synchronises inside the loop); s/step is the mean of the
steady steps (all but the first), "28 steps" is the first step plus 27 steady ones. "transfer" is the
transformer weights streamed per second of a steady step. "pinned" is the host memory page-locked for streaming
after the row, "RSS" the process's resident host memory. The goals are DESIGN §6's; the last column says whether
this run met them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
ASSETS = Path(__file__).resolve().parents[1] / "assets"

# facebook/dinov2-giant's config (not shipped by the pack: the encoders load from their folders)
DINOV2_GIANT = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
                    image_size=518, use_swiglu_ffn=True, layerscale_value=1.0)


@dataclass
class Mode:
    key: str
    label: str
    offload: str
    budget_gb: float | None = None
    fp8: bool = False
    character: bool = True


def modes(small: bool, transformer=None, adapter=None) -> list[Mode]:
    """The rows. At full size the budgets are the goal table's; the scaled-down run takes, from its own block
    sizes, the budgets whose plans keep about as many blocks as 24 and 16 GiB keep of FLUX.1-dev (about 80 % and
    45 %), one that keeps all, and one that keeps none."""
    if small:
        from instantcharacter.run.offload.planner import ACTIVATION_RESERVE_GIB, partial_budgets, transformer_plan

        partial = partial_budgets(transformer, adapter)

        def closest(share):
            return min(partial, key=lambda item: abs(sum(item[1]) / len(item[1]) - share))[0]

        b24, b16 = closest(0.8), closest(0.45)
        resident = transformer_plan(transformer, adapter, "off", None, False).total / GIB + 0.01
        stream = ACTIVATION_RESERVE_GIB + 0.001
    else:
        b24, b16, resident, stream = 24.0, 16.0, 40.0, 4.0
    return [
        Mode("plain", "plain FLUX, no character (off)", "off", character=False),
        Mode("off", "off: every model resident", "off"),
        Mode("resident", f"budget {resident:.4g}: all blocks resident, encoders visit", "budget", resident),
        Mode("budget24", f"budget {b24:.4g}", "budget", b24),
        Mode("budget16", f"budget {b16:.4g}", "budget", b16),
        Mode("stream", f"budget {stream:.4g}: every block streamed, bf16", "budget", stream),
        Mode("stream-fp8", f"budget {stream:.4g}: every block streamed, fp8 storage", "budget", stream, fp8=True),
        Mode("sequential", "sequential (no prefetch)", "sequential"),
    ]


def configs(small: bool) -> dict:
    from instantcharacter.model.projector import PUBLISHED_PROJECTOR
    from instantcharacter.files.single_file import shipped_config

    if not small:
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        siglip = shipped_config("siglip_so400m_patch14_384_vision.json")
        for key in ("image_mean", "image_std"):
            siglip.pop(key, None)
        return dict(transformer=strip(shipped_config("flux1_dev_transformer.json")),
                    clip=shipped_config("clip_l_text.json"), t5=shipped_config("t5_xxl_encoder.json"),
                    vae=strip(shipped_config("flux_vae.json")), siglip=siglip, dino=DINOV2_GIANT,
                    projector=PUBLISHED_PROJECTOR, text_len=512)
    from instantcharacter.testing import tiny as t

    return dict(
        # more blocks than the test twin, so that the budgets between "all" and "none" differ
        transformer=dict(patch_size=1, in_channels=64, num_layers=4,
                         num_single_layers=8, attention_head_dim=t.FLUX_HEAD_DIM,
                         num_attention_heads=t.FLUX_TINY_HEADS, joint_attention_dim=t.T5_TINY_DIM,
                         pooled_projection_dim=t.CLIP_TINY_DIM, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        clip=dict(hidden_size=t.CLIP_TINY_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, projection_dim=t.CLIP_TINY_DIM),
        t5=dict(d_model=t.T5_TINY_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False),
        vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=1, norm_num_groups=4, sample_size=1024, scaling_factor=0.3611,
                 shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        siglip=dict(hidden_size=t.SIGLIP_TINY_WIDTH, intermediate_size=96, num_hidden_layers=27,
                    num_attention_heads=2, image_size=384, patch_size=14),
        dino=dict(DINOV2_GIANT, hidden_size=t.DINO_TINY_WIDTH, num_attention_heads=2, mlp_ratio=2),
        projector=t.tiny_adapter_config(), text_len=32)


@contextlib.contextmanager
def _default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _random(factory, init_device, dtype):
    """Build with the library's own random init on ``init_device`` (on a GPU: seconds for billions of
    weights), then keep it in host memory."""
    with _default_dtype(dtype), torch.device(init_device):
        model = factory()
    return model.to("cpu").eval().requires_grad_(False)


def build(small: bool, init_device, dtype, workdir: Path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model,
                              SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel, T5TokenizerFast)

    from instantcharacter.model.adapter import InstantCharacterAdapter
    from instantcharacter.reference.encoders import DINO_DEFAULT_NORM, SIGLIP_DEFAULT_NORM, ReferenceEncoders
    from instantcharacter.files.single_file import shipped_config
    from instantcharacter.testing.tiny import write_clip_tokenizer, write_t5_tokenizer

    cfg = configs(small)
    # The prompt's token ids only need to lie inside the vocabularies: tokenizers built offline will do.
    clip_vocab = write_clip_tokenizer(workdir / "tokenizer")
    t5_vocab = write_t5_tokenizer(workdir / "tokenizer_2")
    clip_cfg = dict(cfg["clip"])
    if small:
        clip_cfg.update(vocab_size=clip_vocab, bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1,
                        pad_token_id=clip_vocab - 1)
    t5_cfg = dict(cfg["t5"], **({"vocab_size": t5_vocab} if small else {}))
    make = lambda f: _random(f, init_device, dtype)  # noqa: E731
    transformer = make(lambda: FluxTransformer2DModel(**cfg["transformer"]))
    flux = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(shipped_config("flux1_dev_scheduler.json")),
        vae=make(lambda: AutoencoderKL(**cfg["vae"])),
        text_encoder=make(lambda: CLIPTextModel(CLIPTextConfig(**clip_cfg))),
        tokenizer=CLIPTokenizer.from_pretrained(workdir / "tokenizer"),
        text_encoder_2=make(lambda: T5EncoderModel(T5Config(**t5_cfg))),
        tokenizer_2=T5TokenizerFast.from_pretrained(workdir / "tokenizer_2"),
        transformer=transformer)
    n_layers = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    adapter = make(lambda: InstantCharacterAdapter(cfg["projector"], n_layers, transformer.inner_dim))
    norm = lambda pair: tuple(torch.tensor(v).view(1, 3, 1, 1) for v in pair)  # noqa: E731
    encoders = ReferenceEncoders(make(lambda: SiglipVisionModel(SiglipVisionConfig(**cfg["siglip"]))),
                                 make(lambda: Dinov2Model(Dinov2Config(**cfg["dino"]))),
                                 norm(SIGLIP_DEFAULT_NORM), norm(DINO_DEFAULT_NORM))
    return flux, adapter, encoders, cfg["text_len"]


def bandwidth(device) -> float | None:
    """Host→device bytes per second from page-locked memory (registered as the streamer registers its buffers)."""
    if device.type != "cuda":
        return None
    from instantcharacter.run.offload.host_packs import host_buffer

    host, _ = host_buffer(GIB)
    if int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 1)) != 0:
        return None
    try:
        dev = torch.empty_like(host, device=device)
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        return 5 * host.numel() / (time.perf_counter() - start)
    finally:
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


PHASES = ("text encoders", "projector", "denoising", "decode")


class Meter:
    """Peak VRAM of each phase of a call (via the placement's phase notices), step times from CUDA events
    recorded by the sampler's step callback."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.phases: dict[str, tuple[float, float]] = {}
        self.gaps = (0.0, 0.0)  # between the phases
        self.marks: list = []  # denoising start, then one per step

    def _peaks(self) -> tuple[float, float]:
        return (torch.cuda.max_memory_allocated(self.device) / GIB, torch.cuda.max_memory_reserved(self.device) / GIB)

    def _fold(self, into: tuple[float, float]) -> tuple[float, float]:
        got = self._peaks()
        torch.cuda.reset_peak_memory_stats(self.device)
        return max(into[0], got[0]), max(into[1], got[1])

    def phase(self, name: str, when: str) -> None:
        if self.cuda:
            if when == "start":
                self.gaps = self._fold(self.gaps)
            else:
                self.phases[name] = self._fold(self.phases.get(name, (0.0, 0.0)))
        if name == "denoising" and when == "start":
            self.marks = [self._mark()]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def step(self, step, total, _):
        self.marks.append(self._mark())

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.gaps = self._fold(self.gaps)
        self.seconds = time.perf_counter() - self.start

    @property
    def steps(self) -> list[float]:
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    @property
    def step_seconds(self) -> float | None:
        steady = self.steps[1:]  # the first step warms up (and uploads the kept blocks)
        return sum(steady) / len(steady) if steady else None

    def projected(self, steps: int = 28) -> float | None:
        times = self.steps
        return times[0] + (steps - 1) * self.step_seconds if self.step_seconds is not None else None

    @property
    def peak(self) -> tuple[float | None, float | None, str]:
        """Whole call: peak allocated, peak reserved and the phase that set the reserved peak."""
        if not self.cuda:
            return None, None, ""
        entries = [*self.phases.items(), ("between phases", self.gaps)]
        name, (_, reserved) = max(entries, key=lambda item: item[1][1])
        return max(v[0] for _, v in entries), reserved, name


def host_rss() -> float | None:
    """Resident host memory of this process, GiB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")) / GIB
    except (OSError, StopIteration):
        return None


def all_to_host(*modules):
    for m in modules:
        m.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_reference(encoders, device):
    """What the Encode Reference node does: encoders to the device, encode, back to the host."""
    from PIL import Image

    with Meter(device) as meter:
        encoders.to(device)
        try:
            features = encoders.encode([Image.open(ASSETS / "reference_girl.png")])
        finally:
            encoders.to("cpu")
    return features.to("cpu"), meter


def run(flux, adapter, features, mode: Mode, device, size, steps, text_len):
    from instantcharacter.run.pipeline import generate
    from instantcharacter.run.settings import GenerationSettings, MemorySettings, RunHooks

    all_to_host(flux.transformer, flux.text_encoder, flux.text_encoder_2, flux.vae, adapter)  # "off" leaves them
    with Meter(device) as meter:
        settings = GenerationSettings("a girl reading a book in a library, warm light", width=size, height=size,
                                      steps=steps, seed=0, max_sequence_length=text_len)
        memory = MemorySettings(mode.offload, mode.budget_gb, mode.fp8, device)
        result = generate(flux, adapter if mode.character else None, features if mode.character else None,
                          settings, memory, hooks=RunHooks(on_step=meter.step, on_phase=meter.phase))
    return result, meter


def goal(key: str, peak: float | None, step: float | None, rate: float | None, bw: float | None,
         plain: float | None, resident: float | None) -> str:
    """DESIGN §6's goal for the row and, where this run measured what it needs, whether it was met."""
    def at_most(value, limit):
        return None if value is None or limit is None else value <= limit

    def scaled(base, factor):
        return None if base is None else base * factor

    def check(text, *conditions):
        if any(c is None for c in conditions):
            return text
        return f"{'✅' if all(conditions) else '❌'} {text}"

    if key == "resident":
        return check("≤ 32 GiB, ≤ 1.10 × plain", at_most(peak, 32), at_most(step, scaled(plain, 1.10)))
    if key == "budget24":
        return check("≤ 22 GiB, ≤ 1.10 × resident", at_most(peak, 22), at_most(step, scaled(resident, 1.10)))
    if key == "budget16":
        return check("≤ 14.5 GiB, ≤ 1.25 × resident", at_most(peak, 14.5), at_most(step, scaled(resident, 1.25)))
    if key == "stream":
        enough = None if rate is None or bw is None else rate >= 0.85 * bw
        return check("≤ 6 GiB, ≥ 85 % of bandwidth", at_most(peak, 6), enough)
    if key == "stream-fp8":
        return check("≤ 6 GiB, ≤ 0.30 s/step (H100/H200)", at_most(peak, 6), at_most(step, 0.30))
    return ""


class Report:
    """Lines to stdout as they come, and the whole report to ``path`` (rewritten after each line)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.path is not None:
            self.path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (smoke check)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per generation (default 8, --small 3); s/step is the mean of all but the first")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024, --small 128)")
    parser.add_argument("--modes", default="all", help="comma-separated row keys: plain, off, resident, budget24, "
                                                      "budget16, stream, stream-fp8, sequential (default all)")
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    if not args.small and device.type != "cuda":
        print("No CUDA GPU: run with --small for the CPU smoke check.")
        return 2
    steps = args.steps or (3 if args.small else 8)
    if steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    size = args.size or (128 if args.small else 1024)
    dtype = torch.float32 if args.small else torch.bfloat16
    out = Report(args.out)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        flux, adapter, encoders, text_len = build(args.small, device, dtype, Path(tmp))
    from instantcharacter.run.offload.planner import model_sizes
    from instantcharacter.run.offload.host_packs import pinned_host_bytes

    sizes = model_sizes(flux, adapter)
    rows = modes(args.small, flux.transformer, adapter)
    if args.modes != "all":
        wanted = [k.strip() for k in args.modes.split(",") if k.strip()]
        unknown = set(wanted) - {m.key for m in rows}
        if unknown:
            parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(m.key for m in rows)}")
        rows = [m for m in rows if m.key in wanted]
    bw = bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    gb = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    out(f"device: {name}; torch {torch.__version__}; page-locked host→device: "
        f"{f'{bw / 1e9:.1f} GB/s' if bw else 'n/a (no CUDA)'}; {size}², {steps} steps; "
        f"{'tiny' if args.small else 'full-size'} random weights (built in {time.perf_counter() - started:.0f} s): "
        f"transformer blocks + character layers {gb(sizes['blocks'])} GiB, text encoders {gb(sizes['text_encoders'])}, "
        f"projector {gb(sizes['projector'])}, VAE {gb(sizes['vae'])}; memory in GiB")

    features, enc = encode_reference(encoders, device)
    fmt = lambda v, spec=".2f": format(v, spec) if v is not None else "n/a"  # noqa: E731
    out(f"Encode Reference (SigLIP + DINOv2 visit the device): peak alloc {fmt(enc.peak[0])} GiB, "
        f"reserved {fmt(enc.peak[1])} GiB, {enc.seconds:.2f} s")
    out()
    out("| mode | placement | " + " | ".join(f"{p} alloc / reserved" for p in PHASES) +
        " | peak reserved (phase) | s/step | 28 steps s | × plain | × resident | whole call s | transfer GB/s | "
        "% of bandwidth | pinned | RSS | VAE decode | goal (DESIGN §6) |")
    out("|---" * (len(PHASES) + 15) + "|")
    plain = resident = None
    for mode in rows:
        result, meter = run(flux, adapter, features, mode, device, size, steps, text_len)
        step = meter.step_seconds
        if mode.key == "plain":
            plain = step
        if mode.key == "resident":
            resident = step
        rate = result.bytes_streamed / steps / step if result.bytes_streamed and step else None
        pct = f"{100 * rate / bw:.0f}" if rate and bw else "n/a"
        _, reserved, where = meter.peak
        verdict = goal(mode.key, reserved, step, rate, bw, plain, resident) if not args.small else "(tiny run)"
        phases = " | ".join(f"{fmt(meter.phases[p][0])} / {fmt(meter.phases[p][1])}" if p in meter.phases else "n/a"
                            for p in PHASES)
        out(f"| {mode.label} | {result.offload} | {phases} | {fmt(reserved)}{f' ({where})' if where else ''} | "
            f"{fmt(step, '.3f')} | {fmt(meter.projected())} | {fmt(step / plain if plain and step else None)} | "
            f"{fmt(step / resident if resident and step else None)} | {meter.seconds:.1f} | "
            f"{fmt(rate / 1e9 if rate else None)} | {pct} | {pinned_host_bytes() / GIB:.2f} | {fmt(host_rss())} | "
            f"{result.decode} | {verdict} |")
    out()
    out(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
