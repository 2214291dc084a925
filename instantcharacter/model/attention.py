"""Character attention: the per-layer cross-attention from FLUX image queries to the character tokens, and the sum
of several characters' terms. Both paths run it (our diffusers pipeline through :mod:`.processors`, ComfyUI's
native FLUX model through the block patch of nodes/).
"""

from __future__ import annotations

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
