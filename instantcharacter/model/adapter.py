"""The published adapter as a module (projector + one character-attention layer per FLUX attention layer), and
attaching it to a diffusers FLUX transformer (reading and writing the checkpoint: :mod:`..files.adapter_file`)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterFileError
from .attention import CharacterAttentionLayer, CharacterContext, CharacterFluxAttnProcessor
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


class CharacterAttachment:
    """Character attention attached to a diffusers FLUX transformer; ``detach()`` restores it exactly."""

    def __init__(self, transformer, adapter: InstantCharacterAdapter):
        processors = transformer.attn_processors
        if len(processors) != adapter.num_layers:
            raise AdapterFileError(
                f"The adapter has {adapter.num_layers} character-attention layers but this FLUX transformer has "
                f"{len(processors)} attention layers: the adapter was made for another model (FLUX.1-dev has 57)."
            )
        inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        if inner != adapter.hidden_size:
            raise AdapterFileError(
                f"The adapter's layers are {adapter.hidden_size} wide but this FLUX transformer is {inner} wide: "
                f"the adapter was made for another model."
            )
        self.transformer = transformer
        self.context = CharacterContext()
        self._previous = dict(processors)
        transformer.set_attn_processor(
            {name: CharacterFluxAttnProcessor(layer, i, self.context)
             for i, (name, layer) in enumerate(zip(processors, adapter.ip_adapter))}
        )

    def detach(self) -> None:
        if self._previous is not None:
            self.transformer.set_attn_processor(self._previous)
            self._previous = None

    def __enter__(self) -> "CharacterAttachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(transformer, adapter: InstantCharacterAdapter) -> CharacterAttachment:
    """Install character attention on every attention layer of ``transformer`` (double, then single blocks)."""
    return CharacterAttachment(transformer, adapter)
