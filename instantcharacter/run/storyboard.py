"""Storyboards: one character through many panels, the best of k candidates kept for each panel.

A board is a list of panel prompts (a shared style added to each), ``candidates`` pictures per panel and one
board seed. Candidate c of panel n (both counted from 1) is drawn with the seed :func:`candidate_seed` derives
from (board seed, n, c) alone, by the same :func:`~.pipeline.generate` the Sampler runs with that seed and batch
size 1: a panel drawn alone (:func:`render_panel`) gives the picture it has in the whole board, and the Sampler
given the winner's seed draws it again. Every candidate is scored with the consistency score
(:mod:`..reference.consistency`) against the character's prepared pictures, and the one with the highest score is
kept. The models are loaded once for the whole board (:class:`BoardModels`); progress counts panels × candidates ×
steps, and the step callback is the cancel point, as in the Sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
from PIL import Image

from ..errors import InputError
from ..reference.character import plain_features
from ..reference.consistency import ConsistencyScores, consistency_scores
from ..reference.images import FIT_MODES, tensor_to_pil
from .offload.placement import default_device
from .contact_sheet import contact_sheet
from .pipeline import generate
from .settings import MAX_SEED, GenerationSettings, MemorySettings, RunHooks
from .style_loras import StyledFlux

MAX_CANDIDATES = 16
MAX_PANELS_IN_MEMORY = 100  # the node keeps every chosen picture in one IMAGE batch; the CLI writes them as it goes
SEED_RANGE = 2**53  # derived seeds stay exact in the frontend's seed widgets (JavaScript numbers)
PANEL_PLACEHOLDER = "{panel}"
COMMENT = "#"


def panel_lines(text: str) -> list[str]:
    """One panel prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = (line.strip() for line in (text or "").splitlines())
    return [line for line in lines if line and not line.startswith(COMMENT)]


def styled(line: str, style: str) -> str:
    """The panel's full prompt: ``style`` with the line in place of ``{panel}``, or the line then the style."""
    style = (style or "").strip()
    if not style:
        return line
    if PANEL_PLACEHOLDER in style:
        return style.replace(PANEL_PLACEHOLDER, line)
    return f"{line}, {style}"


def panel_prompts(text: str, style: str = "") -> list[str]:
    """The board's prompts from a panels text (see :func:`panel_lines`) and a shared style (see :func:`styled`)."""
    return [styled(line, style) for line in panel_lines(text)]


def _derived(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def candidate_seed(seed: int, panel: int, candidate: int) -> int:
    """The seed of candidate ``candidate`` of panel ``panel`` (both from 1) on a board with seed ``seed``."""
    return _derived(seed, panel, candidate)


def panel_seed(seed: int, panel: int) -> int:
    """One seed per panel (for a sampler that draws a panel's candidates as one batch, like KSampler)."""
    return _derived(seed, panel)


@dataclass(frozen=True)
class Board:
    """What to draw: the full prompts (panel 1 first), candidates per panel, the board seed, and the Sampler's
    settings every candidate is drawn with (their prompt, seed and batch size are the board's: ignored here)."""

    prompts: tuple[str, ...]
    candidates: int = 4
    seed: int = 0
    settings: GenerationSettings = GenerationSettings("")
    memory: MemorySettings = MemorySettings()

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))

    @property
    def panels(self) -> int:
        return len(self.prompts)

    @property
    def steps_per_panel(self) -> int:
        return self.candidates * self.settings.steps

    def candidate_settings(self, panel: int, candidate: int) -> GenerationSettings:
        return dataclasses.replace(self.settings, prompt=self.prompts[panel - 1], batch_size=1, decode=True,
                                   seed=candidate_seed(self.seed, panel, candidate))

    def check(self, limit: int | None = None) -> None:
        """Refuse a board that cannot run, before any model moves: no panels, too many, bad counts."""
        if not self.prompts:
            raise InputError("The storyboard has no panel lines: write one prompt per line (blank lines and lines "
                             "starting with # are skipped).")
        if limit is not None and len(self.prompts) > limit:
            raise InputError(f"The storyboard has {len(self.prompts)} panels; at most {limit} fit in one run here. "
                             "Split the story over several boards, or use the command line (python -m "
                             "instantcharacter storyboard), which writes each panel as it is done.")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise InputError(f"candidates must be between 1 and {MAX_CANDIDATES}, got {self.candidates}.")
        dataclasses.replace(self.settings, prompt="", batch_size=1).check()
        self.memory.check()
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED} (2^64 - 1), got {self.seed}.")


def check_prompt_lengths(tokenizer, prompts: Sequence[str], limit: int) -> None:
    """Refuse, by panel number, a prompt longer than T5 reads (``limit`` tokens; FLUX.1-dev: 512): T5 would cut
    it off silently."""
    if tokenizer is None:
        return
    for number, prompt in enumerate(prompts, 1):
        count = len(tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids)
        if count > limit:
            raise InputError(f"Panel {number} is {count} T5 tokens long with the style; T5 reads at most {limit}. "
                             f"Shorten that line (or the style): it starts {prompt[:60]!r}.")


def score_references(character) -> tuple[list[Image.Image], str]:
    """The character's prepared pictures (the small previews it keeps, as Load Character shows them) that the
    candidates are scored against, and the fit they were prepared with."""
    features = plain_features(character, "Storyboard")
    source = getattr(features, "source", None)
    if source is None or source.preview is None or len(source.preview) == 0:
        raise InputError("This character keeps no prepared pictures to score the candidates against: use a "
                         "character from Encode Reference, Blend Characters or a file Save Character wrote.")
    fit = source.settings.get("fit", "stretch") if isinstance(source.settings, dict) else "stretch"
    pictures = [Image.fromarray(p.numpy()) for p in source.preview.to(torch.uint8)]
    return pictures, fit if fit in FIT_MODES else "stretch"


@dataclass
class PanelResult:
    """One finished panel: the kept candidate's picture ([H, W, 3], 0–1) and LATENT ([16, H/8, W/8], raw VAE
    space), and every candidate's seed and scores (candidates counted from 1 in :meth:`record`)."""

    number: int
    prompt: str
    seeds: list[int]
    scores: ConsistencyScores
    chosen: int  # index into seeds / scores
    image: torch.Tensor
    latent: torch.Tensor
    made_by: str = ""  # where it was drawn (host and process), for logs

    @property
    def seed(self) -> int:
        return self.seeds[self.chosen]

    def record(self) -> dict:
        """What a manifest line and the report say about the panel."""
        return {"panel": self.number, "prompt": self.prompt, "candidate": self.chosen + 1, "seed": self.seed,
                "seeds": list(self.seeds), "scores": [round(s, 6) for s in self.scores.combined],
                "siglip": [round(s, 6) for s in self.scores.siglip],
                "dinov2": [round(s, 6) for s in self.scores.dino]}

    def summary(self) -> str:
        scores = ", ".join(f"{s:.3f}" for s in self.scores.combined)
        return (f"panel {self.number}: scores {scores} → candidate {self.chosen + 1} (seed {self.seed}); "
                f"{self.prompt}")


@dataclass
class StoryboardResult:
    panels: list[PanelResult]

    @property
    def images(self) -> torch.Tensor:
        return torch.stack([p.image for p in self.panels])

    @property
    def latents(self) -> torch.Tensor:
        return torch.stack([p.latent for p in self.panels])

    def contact_sheet(self) -> Image.Image:
        return contact_sheet([p.image for p in self.panels], [p.prompt for p in self.panels])

    def report(self) -> str:
        return "\n".join(p.summary() for p in self.panels)


@dataclass
class BoardModels:
    """The models a board needs, loaded once: FLUX, the adapter, and the image encoders for the score."""

    flux: object
    adapter: object
    encoders: object

    @classmethod
    def load(cls, paths: dict, dtype: torch.dtype) -> "BoardModels":
        """From a models folder's paths (``flux``, ``adapter``, ``siglip``, ``dinov2``)."""
        from ..files.adapter_file import load_adapter
        from ..files.encoder_files import load_reference_encoders
        from ..files.flux import load_flux

        encoders = load_reference_encoders(paths["siglip"], paths["dinov2"], dtype=dtype)
        return cls(load_flux(paths["flux"], dtype=dtype), load_adapter(paths["adapter"], dtype=dtype), encoders)


@contextlib.contextmanager
def encoders_on(encoders, device):
    """The image encoders on ``device`` for the block (the score), back on the CPU afterwards."""
    encoders.to(device)
    try:
        yield encoders
    finally:
        encoders.to("cpu")


def render_panel(models: BoardModels, board: Board, character, number: int, *, hooks: RunHooks = RunHooks(),
                 scoring: Callable[[], ContextManager] | None = None, references=None) -> PanelResult:
    """Draw panel ``number`` (from 1): every candidate, scored, the best kept.

    ``hooks`` as :func:`~.pipeline.generate` takes them, ``on_step(done, total, denoised)`` counting this panel's
    steps over all its candidates (``total`` = candidates × steps). ``scoring()`` is entered around the score
    (default: the encoders visit the board's device for it). ``references``: :func:`score_references` of the
    character, when the caller has them already."""
    if not 1 <= number <= board.panels:
        raise InputError(f"Panel {number} is not on this board (panels 1–{board.panels}).")
    features = plain_features(character, "Storyboard")
    pictures, fit = references or score_references(features)
    steps = board.settings.steps
    images, latents, seeds = [], [], []
    for candidate in range(1, board.candidates + 1):
        offset = (candidate - 1) * steps

        def on_step(step, total, denoised, offset=offset):
            hooks.on_step(offset + step, board.steps_per_panel, denoised)

        settings = board.candidate_settings(number, candidate)
        counted = dataclasses.replace(hooks, on_step=on_step if hooks.on_step is not None else None)
        result = generate(models.flux, models.adapter, features, settings, board.memory, hooks=counted)
        images.append(result.images[0])
        latents.append(result.latents[0])
        seeds.append(settings.seed)
    hooks.cancel_point()
    if scoring is None:
        device = board.memory.device if board.memory.device is not None else default_device()
        scoring = lambda: encoders_on(models.encoders, device)  # noqa: E731
    with scoring():
        scores = consistency_scores(models.encoders, pictures, [tensor_to_pil(im) for im in images], fit)
    best = scores.best
    return PanelResult(number, board.prompts[number - 1], seeds, scores, best, images[best], latents[best],
                       made_by=f"{platform.node()} pid {os.getpid()}")


def storyboard(models: BoardModels, board: Board, character, *, hooks: RunHooks = RunHooks(),
               scoring: Callable[[], ContextManager] | None = None, panel_limit: int | None = None,
               on_panel: Callable[[PanelResult], None] | None = None) -> StoryboardResult:
    """Draw the whole board, panel by panel, in memory. ``hooks.on_step(done, total, denoised)`` counts panels ×
    candidates × steps; ``on_panel(result)`` is called as each panel is finished."""
    board.check(panel_limit)
    check_prompt_lengths(getattr(StyledFlux.of(models.flux).pipeline, "tokenizer_2", None), board.prompts,
                         board.settings.max_sequence_length)
    references = score_references(character)
    total = board.panels * board.steps_per_panel
    panels = []
    for number in range(1, board.panels + 1):
        offset = (number - 1) * board.steps_per_panel

        def on_step(done, _, denoised, offset=offset):
            hooks.on_step(offset + done, total, denoised)

        counted = dataclasses.replace(hooks, on_step=on_step if hooks.on_step is not None else None)
        panel = render_panel(models, board, character, number, hooks=counted, scoring=scoring, references=references)
        panels.append(panel)
        if on_panel is not None:
            on_panel(panel)
    return StoryboardResult(panels)


def board_identity(board: Board, character: str, models: dict | None = None) -> str:
    """A short fingerprint of everything that makes a board's pictures (not its prompts, which each panel keeps):
    the settings, the seed, the candidates, the ``character`` (a key the caller makes from what the user gave: a
    file's or the reference pictures' checksums, never the computed features, whose last bits follow the machine)
    and the ``models`` the caller names."""
    settings = dataclasses.asdict(dataclasses.replace(board.settings, prompt="", seed=0, batch_size=1))
    what = {"candidates": board.candidates, "seed": board.seed, "settings": settings,
            "fp8": board.memory.fp8_storage, "character": character, "models": models or {}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
