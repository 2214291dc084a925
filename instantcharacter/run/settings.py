"""What a pipeline-path run is given, each with its checks: the picture's settings (:class:`GenerationSettings`),
where the models live (:class:`MemorySettings`), and what the caller hears from the run and how it stops it
(:class:`RunHooks`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError

MAX_SIZE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate. The defaults are the official InstantCharacter settings.

    ``denoise`` < 1 with init latents is img2img in ComfyUI's sense: a schedule of round(steps / denoise) steps
    of which the last ``steps`` run. True CFG runs when ``negative_prompt`` is given and ``true_cfg`` > 1. The
    character acts on the steps whose index i satisfies ``start_percent <= i / steps < end_percent``, with
    ``subject_scale`` times ``double_blocks_weight`` in the double-stream blocks and times
    ``single_blocks_weight`` in the single-stream ones; ``character_on_negative`` also applies it on the
    negative pass, as the official pipeline does."""

    prompt: str
    negative_prompt: str | None = None
    true_cfg: float = 1.0
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    seed: int = 0
    subject_scale: float = 0.9
    batch_size: int = 1
    denoise: float = 1.0
    max_sequence_length: int = 512
    character_on_negative: bool = True
    start_percent: float = 0.0
    end_percent: float = 1.0
    double_blocks_weight: float = 1.0
    single_blocks_weight: float = 1.0
    decode: bool = True

    @property
    def true_cfg_runs(self) -> bool:
        return self.negative_prompt is not None and self.true_cfg > 1

    def check(self) -> None:
        """Refuse settings that cannot work, before any model moves: sizes, counts and non-finite numbers."""
        check_size(self.width, self.height)
        numbers = {name: getattr(self, name) for name in ("true_cfg", "guidance", "subject_scale", "denoise",
                                                            "start_percent", "end_percent", "double_blocks_weight",
                                                            "single_blocks_weight")}
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value}.")
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps} (the character tokens of "
                             "every step are computed up front).")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InputError(f"batch_size must be between 1 and {MAX_BATCH}, got {self.batch_size}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED} (2^64 - 1), got {self.seed}.")
        if not 0 < self.denoise <= 1:
            raise InputError(f"denoise must be in (0, 1], got {self.denoise}.")
        if not 0 <= self.start_percent <= self.end_percent <= 1:
            raise InputError(f"Need 0 ≤ start_percent ≤ end_percent ≤ 1, got {self.start_percent} and "
                             f"{self.end_percent}.")


@dataclass(frozen=True)
class MemorySettings:
    """Where the models live during a run (see :mod:`.offload`): ``offload`` one of ``auto``, ``off``,
    ``budget``, ``sequential``; ``vram_budget_gb`` for ``budget``; ``fp8_storage`` keeps the transformer and
    character-attention weights in fp8; ``device`` None picks CUDA when there is one."""

    offload: str = "auto"
    vram_budget_gb: float | None = None
    fp8_storage: bool = False
    device: str | torch.device | None = None

    def check(self) -> None:
        if self.vram_budget_gb is not None and not (math.isfinite(self.vram_budget_gb) and self.vram_budget_gb > 0):
            raise InputError(f"vram_budget_gb must be a positive number of GB, got {self.vram_budget_gb}.")
        if self.device is None:
            return
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise InputError(f"device {self.device!r} is not a torch device (e.g. 'cuda', 'cuda:1' or 'cpu').") from err
        if device.type == "meta":  # moving the models there would drop their weights until they are loaded again
            raise InputError("device 'meta' holds no data: the models would lose their weights. Use 'cuda' or 'cpu'.")
        missing = not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
        if device.type == "cuda" and missing:
            raise InputError(f"device {self.device!r} is not here ({torch.cuda.device_count()} CUDA device(s) found).")


@dataclass(frozen=True)
class RunHooks:
    """What the caller of a run hears from it, and how it stops it. Raising from a hook stops the run (that is how
    Cancel works); whatever happens, the models are left as they were.

    ``on_step(step, total, denoised)`` is called after every denoising step; ``denoised`` is the step's estimate of
    the finished latents when ``previews`` is set (for live previews: [B, 16, H/8, W/8] in FLUX's model latent
    space, ComfyUI's Flux latent format), else None (then nothing is unpacked for it). ``cancel_check()`` is
    called between the other phases and inside the long ones (before every T5 block, every decoded image or
    tile). ``on_phase(phase, "start" | "end")`` is called around each phase: "text encoders", "projector",
    "denoising", "decode" (the memory benchmark measures each)."""

    on_step: Callable[[int, int, torch.Tensor | None], None] | None = None
    previews: bool = False
    cancel_check: Callable[[], None] | None = None
    on_phase: Callable[[str, str], None] | None = None

    def cancel_point(self) -> None:
        if self.cancel_check is not None:
            self.cancel_check()


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < 16 or value > MAX_SIZE:
            raise InputError(f"{name} {value} is outside 16–{MAX_SIZE} pixels (the sampler node's range).")
        if value % 16:
            lower, upper = value // 16 * 16, (value // 16 + 1) * 16
            raise InputError(
                f"{name} {value} is not a multiple of 16 (FLUX works on 16-pixel patches); use {lower} or {upper}."
            )
