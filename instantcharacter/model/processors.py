"""Character attention inside a diffusers FLUX transformer (the pipeline path): the per-call context the pipeline
sets, the attention processor that runs a FLUX attention layer exactly like diffusers' own ``FluxAttnProcessor`` and
adds the character attention to the image part of its output before the output projection, and attaching them to
a transformer (``detach()`` restores it exactly)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AdapterFileError
from .adapter import InstantCharacterAdapter
from .attention import CharacterAttentionLayer, weighted_sum


@dataclass
class CharacterContext:
    """Per-call state shared by every processor of one transformer.

    The pipeline sets the characters before each transformer call (their tokens depend on the timestep):
    ``characters``, pairs of (tokens, weight per image token or None for everywhere); none switch the character
    attention off. ``layer_scales`` multiplies it per layer index (double blocks first; 1 for a layer not listed;
    0 switches that layer off).
    ``image_seq_len`` is the number of image tokens: single-stream layers see [text ; image] and the
    character acts on the image positions only.
    ``kv_cache``, when a dict, keeps each layer's character keys and values from one transformer call for the
    next (the pipeline sets a fresh one per step when both CFG passes carry the character, so the negative
    pass reuses the positive pass's projections); None projects them in every call.
    """

    image_seq_len: int = 0
    layer_scales: dict[int, float] = field(default_factory=dict)
    characters: tuple[tuple[torch.Tensor, torch.Tensor | None], ...] = ()
    kv_cache: dict | None = None

    def keys_values(self, index: int, position: int, layer: CharacterAttentionLayer,
                    tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values of the ``position``-th acting character."""
        if self.kv_cache is None:
            return layer.keys_values(tokens)
        found = self.kv_cache.get((index, position))
        if found is None:
            found = self.kv_cache[(index, position)] = layer.keys_values(tokens)
        return found

    def scale_for(self, index: int) -> float:
        return self.layer_scales.get(index, 1.0)


class CharacterFluxAttnProcessor:
    """diffusers processor for a ``FluxAttention`` layer with character attention.

    The FLUX part mirrors diffusers' ``FluxAttnProcessor`` step by step (same ops, same dispatch), so with
    the character switched off the output is the one diffusers gives.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: CharacterAttentionLayer, index: int, context: CharacterContext):
        self.layer = layer
        self.index = index
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        raw_query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query = attn.norm_q(raw_query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        double_stream = encoder_hidden_states is not None
        if double_stream:
            enc_q = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)

        scale = self.context.scale_for(self.index)
        acting = self.context.characters if scale != 0 else ()

        if double_stream:
            text_len = encoder_hidden_states.shape[1]
            enc_out, img_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            if acting:
                img_out = img_out + scale * self._characters(raw_query, acting)
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            return img_out, attn.to_add_out(enc_out.contiguous())

        if acting:
            img_len = self.context.image_seq_len
            if not 0 < img_len <= out.shape[1]:
                raise RuntimeError("CharacterContext.image_seq_len must be set to the image token count")
            img = out[:, -img_len:] + scale * self._characters(raw_query[:, -img_len:], acting)
            out = torch.cat([out[:, :-img_len], img], dim=1)
        return out

    def _characters(self, image_query: torch.Tensor, acting) -> torch.Tensor:
        """The sum of the characters' attention, each times its weight per image token (where it has one)."""
        return weighted_sum(
            (self.layer.attend(image_query, *self.context.keys_values(self.index, position, self.layer, tokens)),
             None if weight is None else weight[None, :, None])
            for position, (tokens, weight) in enumerate(acting))


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
