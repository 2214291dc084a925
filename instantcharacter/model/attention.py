"""Character attention: the per-layer cross-attention from FLUX image queries to the character tokens.

The math lives in :class:`CharacterAttentionLayer` and is shared by both paths (our diffusers pipeline and
ComfyUI's native FLUX model). :class:`CharacterFluxAttnProcessor` is the diffusers processor that runs a
FLUX attention layer exactly like diffusers' own ``FluxAttnProcessor`` and adds the character attention
to the image part of the output before the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IP_HEAD_DIM = 128


class HeadNorm(nn.Module):
    """``y = scale · x / (‖x‖₂/√d + eps)`` over the last dimension.

    Not ``torch.nn.RMSNorm``: the eps is added to the root mean square, not inside the square root.
    """

    casts_own_parameters = True  # its forward copies ``scale`` to the input's device (see forward)

    def __init__(self, dim: int = IP_HEAD_DIM, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        # ComfyUI may leave this small parameter on its offload device (it moves only its own layer classes)
        return self.scale.to(x.device) * (x / (rms + self.eps))


class InputCastLinear(nn.Linear):
    """A Linear that computes in its weight's dtype at the moment it runs: the block streamer may swap in a copy
    of the weight (not of the bias) in the transformer's dtype just before, so with a FLUX in bf16 and an
    adapter loaded in fp32 the dtype cannot be read beforehand."""

    casts_input_to_weight_dtype = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        return F.linear(x.to(dtype), self.weight, None if self.bias is None else self.bias.to(dtype))


class CharacterAttentionLayer(nn.Module):
    """One of the 57 ``ip_adapter`` modules: keys/values from the character tokens for one FLUX layer."""

    def __init__(self, hidden_size: int, token_dim: int, head_dim: int = IP_HEAD_DIM):
        super().__init__()
        self.head_dim = head_dim
        self.norm_ip_q = HeadNorm(head_dim)
        self.to_k_ip = InputCastLinear(token_dim, hidden_size)
        self.norm_ip_k = HeadNorm(head_dim)
        self.to_v_ip = InputCastLinear(token_dim, hidden_size)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed) and values from the character tokens [T, N, token_dim], per head [T, H, N, D]. One
        character's tokens are the same for every batch row, so T is 1 and they are projected once."""
        key = self.norm_ip_k(self._heads(self.to_k_ip(tokens)))
        return key, self._heads(self.to_v_ip(tokens))

    def attend(self, image_query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``image_query``: the layer's raw ``to_q`` output for the image tokens [B, L, H·D] (before FLUX's
        q-norm and RoPE); ``key``/``value`` from :meth:`keys_values`, for one row or all. Returns [B, L, H·D]."""
        batch = image_query.shape[0]
        dtype = key.dtype  # the adapter weights' dtype (as stored, or as streamed)
        if key.shape[0] != batch:
            key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
        query = self.norm_ip_q(self._heads(image_query)).to(dtype)
        out = F.scaled_dot_product_attention(query, key.to(dtype), value.to(dtype))
        return out.transpose(1, 2).flatten(2).to(image_query.dtype)

    def forward(self, image_query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The character attention of ``image_query`` [B, L, H·D] to ``tokens`` [1 or B, N, token_dim]."""
        return self.attend(image_query, *self.keys_values(tokens))


def weighted_sum(terms) -> torch.Tensor:
    """The characters' attention terms added up, each times its weight: ``terms`` are (term [B, L, H·D], weight)
    pairs, the weight None (1 everywhere) or a tensor broadcast against the term (per generated token, per batch
    row, or both). Both paths add their characters here."""
    total = None
    for term, weight in terms:
        if weight is not None:
            term = term * weight.to(term.device, term.dtype)
        total = term if total is None else total + term
    return total


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
