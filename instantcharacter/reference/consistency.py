"""How much generated pictures look like the reference: cosine similarity of SigLIP and DINOv2 embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .encoders import ReferenceEncoders
from .images import prepare_reference


@dataclass
class ConsistencyScores:
    siglip: list[float]
    dino: list[float]

    @property
    def combined(self) -> list[float]:
        return [(s + d) / 2 for s, d in zip(self.siglip, self.dino)]

    @property
    def best(self) -> int:
        return max(range(len(self.combined)), key=self.combined.__getitem__)

    def report(self) -> str:
        lines = [f"image {i}: SigLIP {s:.3f}, DINOv2 {d:.3f}, mean {c:.3f}"
                 for i, (s, d, c) in enumerate(zip(self.siglip, self.dino, self.combined))]
        return "\n".join(lines + [f"best: image {self.best}"])


def consistency_scores(encoders: ReferenceEncoders, references: list[Image.Image], generated: list[Image.Image],
                       fit: str = "stretch", masks: list | None = None) -> ConsistencyScores:
    """Cosine similarity between the reference (the mean embedding of several reference pictures) and each
    generated picture, per encoder. Both go through the same preparation as encoding a reference."""
    masks = masks or [None] * len(references)
    ref_sig, ref_dino = encoders.embed([prepare_reference(r, fit, m) for r, m in zip(references, masks)])
    gen_sig, gen_dino = encoders.embed([prepare_reference(g, fit) for g in generated])

    def cosines(ref: torch.Tensor, gen: torch.Tensor) -> list[float]:
        return F.cosine_similarity(gen, ref.mean(0, keepdim=True), dim=-1).tolist()

    return ConsistencyScores(cosines(ref_sig, gen_sig), cosines(ref_dino, gen_dino))
