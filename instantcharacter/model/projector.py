"""The InstantCharacter projector (``image_proj`` in the checkpoint).

It turns the reference features into character tokens in two stages:

* :meth:`CharacterProjector.merge_features` — the cross-layer and cross-scale branches. Nothing here
  depends on the timestep, so it runs once per reference.
* :meth:`CharacterProjector.tokens` — the time resampler, the only part that sees the timestep. It is
  cheap and is called once per denoising step (or for all steps at once).

Parameter names follow the published checkpoint exactly, so ``load_state_dict(strict=True)`` works.
Head counts are not stored in a checkpoint; the architecture fixes the head size at 64 for both the
projector blocks and the resampler, and the head count is width / 64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_HEAD_DIM = 64
TIMESTEP_CHANNELS = 320


@dataclass(frozen=True)
class ProjectorConfig:
    feature_dim: int  # SigLIP width + DINOv2 width (2688 in the published model)
    num_blocks: int  # per branch (4)
    ff_inner_dim: int  # GEGLU inner width (10752)
    mlp_hidden_dim: int  # branch MLP width (5376)
    resampler_dim: int  # (1280)
    resampler_depth: int  # (4)
    resampler_ff_dim: int  # (5120)
    num_queries: int  # character tokens (1024)
    token_dim: int  # FLUX text width (4096)
    timestep_channels: int = TIMESTEP_CHANNELS

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "ProjectorConfig":
        def count(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

        latents = sd["resampler.latents"]
        return cls(
            feature_dim=sd["proj.fc1.weight"].shape[1],
            num_blocks=count("cross_layer_blocks."),
            ff_inner_dim=sd["cross_layer_blocks.0.ff.net.2.weight"].shape[1],
            mlp_hidden_dim=sd["proj.fc1.weight"].shape[0],
            resampler_dim=latents.shape[2],
            resampler_depth=count("resampler.layers."),
            resampler_ff_dim=sd["resampler.layers.0.1.1.weight"].shape[0],
            num_queries=latents.shape[1],
            token_dim=sd["resampler.proj_out.weight"].shape[0],
            timestep_channels=sd["resampler.time_embedding.linear_1.weight"].shape[1],
        )


PUBLISHED_PROJECTOR = ProjectorConfig(
    feature_dim=1152 + 1536,
    num_blocks=4,
    ff_inner_dim=4 * 2688,
    mlp_hidden_dim=2 * 2688,
    resampler_dim=1280,
    resampler_depth=4,
    resampler_ff_dim=4 * 1280,
    num_queries=1024,
    token_dim=4096,
)


def _heads(width: int) -> int:
    if width % PROJECTOR_HEAD_DIM:
        raise ValueError(f"projector width {width} is not a multiple of the head size {PROJECTOR_HEAD_DIM}")
    return width // PROJECTOR_HEAD_DIM


class _Attention(nn.Module):
    """Multi-head attention without biases on q/k/v (``attention_bias=False``), with an output bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = _heads(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _Block(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to ``context``, GEGLU feed-forward."""

    def __init__(self, dim: int, ff_inner: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn1 = _Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn2 = _Attention(dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = _FeedForward(dim, ff_inner)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = _heads(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, latents, shift, scale):
        x = self.norm1(x)
        latents = self.norm2(latents) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = split(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = split(k), split(v)
        # q and k are each scaled by dim_head^-1/4 (not the product by dim_head^-1/2) for fp16 range.
        qk_scale = 1 / math.sqrt(math.sqrt(PROJECTOR_HEAD_DIM))
        weights = (q * qk_scale) @ (k * qk_scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        return self.to_out((weights @ v).transpose(1, 2).flatten(2))


def _resampler_ff(dim: int, inner: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class _TimeResampler(nn.Module):
    casts_own_parameters = True  # its forward copies ``latents`` to the input's device

    def __init__(self, cfg: ProjectorConfig):
        from diffusers.models.embeddings import TimestepEmbedding

        super().__init__()
        dim = cfg.resampler_dim
        self.latents = nn.Parameter(torch.zeros(1, cfg.num_queries, dim))
        self.proj_in = nn.Linear(cfg.feature_dim, dim)
        self.proj_out = nn.Linear(dim, cfg.token_dim)
        self.norm_out = nn.LayerNorm(cfg.token_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _PerceiverAttention(dim),
                    _resampler_ff(dim, cfg.resampler_ff_dim),
                    nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim)),
                ]
            )
            for _ in range(cfg.resampler_depth)
        )
        self.time_embedding = TimestepEmbedding(cfg.timestep_channels, dim, act_fn="silu")
        self.timestep_channels = cfg.timestep_channels

    def time_embed(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        sinusoid = get_timestep_embedding(
            timesteps, self.timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return self.time_embedding(sinusoid.to(dtype))

    def forward(self, x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_in``: proj_in(merged features) [1 or B, N, dim]; ``timesteps``: [B] on the 0–1000 scale."""
        temb = self.time_embed(timesteps, x_in.dtype)
        batch = temb.shape[0]
        x = (x_in + temb[:, None]) if x_in.shape[0] == batch else (x_in.expand(batch, -1, -1) + temb[:, None])
        latents = self.latents.to(x.device).expand(batch, -1, -1)  # may sit on ComfyUI's offload device
        for attn, ff, ada in self.layers:
            shift_attn, scale_attn, shift_ff, scale_ff = ada(temb).chunk(4, dim=1)
            latents = attn(x, latents, shift_attn, scale_attn) + latents
            h = ff[0](latents) * (1 + scale_ff.unsqueeze(1)) + shift_ff.unsqueeze(1)
            for layer in ff[1:]:
                h = layer(h)
            latents = h + latents
        return self.norm_out(self.proj_out(latents))


class CharacterProjector(nn.Module):
    """Reference features → character tokens (the checkpoint's ``image_proj``)."""

    def __init__(self, cfg: ProjectorConfig = PUBLISHED_PROJECTOR):
        super().__init__()
        self.config = cfg
        d = cfg.feature_dim
        self.cross_layer_blocks = nn.ModuleList(_Block(d, cfg.ff_inner_dim) for _ in range(cfg.num_blocks))
        self.cross_scale_blocks = nn.ModuleList(_Block(d, cfg.ff_inner_dim) for _ in range(cfg.num_blocks))
        self.proj = _Mlp(d, cfg.mlp_hidden_dim)
        self.proj_cross_layer = _Mlp(d, cfg.mlp_hidden_dim)
        self.proj_cross_scale = _Mlp(d, cfg.mlp_hidden_dim)
        self.resampler = _TimeResampler(cfg)

    def merge_features(
        self, low_res_shallow: torch.Tensor, low_res_deep: torch.Tensor, high_res_deep: torch.Tensor
    ) -> torch.Tensor:
        """The timestep-independent part. Returns the resampler input ``proj_in(merged)`` [B, 2·729, dim]."""
        cross_layer = low_res_deep
        for block in self.cross_layer_blocks:
            cross_layer = block(cross_layer, low_res_shallow)
        cross_scale = low_res_deep
        for block in self.cross_scale_blocks:
            cross_scale = block(cross_scale, high_res_deep)
        merged = torch.cat(
            [self.proj(low_res_deep) + self.proj_cross_scale(cross_scale), self.proj_cross_layer(cross_layer)],
            dim=1,
        )
        return self.resampler.proj_in(merged)

    def tokens(self, merged: torch.Tensor, timesteps: torch.Tensor | float) -> torch.Tensor:
        """Character tokens [B, num_queries, token_dim] for timesteps on the 0–1000 scale (sigma × 1000).

        ``timesteps`` may be a scalar or a [B] tensor; a [B] tensor with one entry per denoising step gives
        the tokens of all steps in one call when ``merged`` has batch 1.
        """
        t = torch.as_tensor(timesteps, device=merged.device)
        if t.ndim == 0:
            t = t[None]
        return self.resampler(merged, t.to(merged.dtype))

    def forward(self, low_res_shallow, low_res_deep, high_res_deep, timesteps):
        return self.tokens(self.merge_features(low_res_shallow, low_res_deep, high_res_deep), timesteps)
