"""The published adapter as a module: the projector and one character-attention layer per FLUX attention layer
(reading and writing the checkpoint: :mod:`..files.adapter_file`; attaching it to a diffusers transformer:
:mod:`.processors`)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import CharacterAttentionLayer
from .projector import PUBLISHED_PROJECTOR, CharacterProjector, ProjectorConfig

PUBLISHED_NUM_LAYERS = 19 + 38
PUBLISHED_HIDDEN_SIZE = 3072


class InstantCharacterAdapter(nn.Module):
    """The projector (``image_proj``) and the per-layer character attention (``ip_adapter``)."""

    def __init__(
        self,
        projector: ProjectorConfig = PUBLISHED_PROJECTOR,
        num_layers: int = PUBLISHED_NUM_LAYERS,
        hidden_size: int = PUBLISHED_HIDDEN_SIZE,
    ):
        super().__init__()
        self.image_proj = CharacterProjector(projector)
        self.ip_adapter = nn.ModuleList(
            CharacterAttentionLayer(hidden_size, projector.token_dim) for _ in range(num_layers)
        )

    @property
    def num_layers(self) -> int:
        return len(self.ip_adapter)

    @property
    def hidden_size(self) -> int:
        return self.ip_adapter[0].to_k_ip.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.ip_adapter[0].to_k_ip.weight.dtype
