"""Tiny FLUX LoRA files for the tiny FLUX of :mod:`testing`, in each file format users meet.

One random LoRA is described in FLUX's original (BFL) layer names, each layer as (down [rank, in], up [out, rank]),
and written in the kohya, ComfyUI, BFL, XLabs or diffusers layout, so tests can check that every format has the
same effect. :func:`diffusers_deltas` gives the weight change each diffusers layer should get (what merging would
do), for checking the non-destructive application against.

Single-block ``linear1`` (fused q/k/v/mlp) is not in these files: diffusers' kohya converter splits it with the
real FLUX.1 widths (3072/12288), which the tiny model does not have.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny import FLUX_HEAD_DIM, FLUX_TINY_DOUBLE, FLUX_TINY_HEADS, FLUX_TINY_SINGLE, T5_TINY_DIM

LORA_FORMATS = ("kohya", "comfyui", "bfl", "xlabs", "diffusers")
HIDDEN = FLUX_TINY_HEADS * FLUX_HEAD_DIM
MLP = 4 * HIDDEN
LATENT_CHANNELS = 64  # packed 2×2 patches of 16 channels

# BFL layer → (in, out, diffusers layer(s); several when the BFL layer is fused and split in diffusers)
_DOUBLE = {
    "img_attn.qkv": (HIDDEN, 3 * HIDDEN, ("attn.to_q", "attn.to_k", "attn.to_v")),
    "img_attn.proj": (HIDDEN, HIDDEN, ("attn.to_out.0",)),
    "img_mlp.0": (HIDDEN, MLP, ("ff.net.0.proj",)),
    "img_mlp.2": (MLP, HIDDEN, ("ff.net.2",)),
    "img_mod.lin": (HIDDEN, 6 * HIDDEN, ("norm1.linear",)),
    "txt_attn.qkv": (HIDDEN, 3 * HIDDEN, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "txt_attn.proj": (HIDDEN, HIDDEN, ("attn.to_add_out",)),
    "txt_mlp.0": (HIDDEN, MLP, ("ff_context.net.0.proj",)),
    "txt_mlp.2": (MLP, HIDDEN, ("ff_context.net.2",)),
    "txt_mod.lin": (HIDDEN, 6 * HIDDEN, ("norm1_context.linear",)),
}
_SINGLE = {
    "linear2": (HIDDEN + MLP, HIDDEN, ("proj_out",)),
    "modulation.lin": (HIDDEN, 3 * HIDDEN, ("norm.linear",)),
}
_OTHER = {
    "img_in": (LATENT_CHANNELS, HIDDEN, ("x_embedder",)),
    "txt_in": (T5_TINY_DIM, HIDDEN, ("context_embedder",)),
    "final_layer.linear": (HIDDEN, LATENT_CHANNELS, ("proj_out",)),
}
# What XLabs files hold: the attention of the double blocks.
_XLABS = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
          "txt_attn.proj": "proj_lora2"}


def _layout() -> dict[str, tuple[int, int, tuple[str, ...]]]:
    out = {}
    for i in range(FLUX_TINY_DOUBLE):
        for name, (n_in, n_out, targets) in _DOUBLE.items():
            out[f"double_blocks.{i}.{name}"] = (n_in, n_out, tuple(f"transformer_blocks.{i}.{t}" for t in targets))
    for i in range(FLUX_TINY_SINGLE):
        for name, (n_in, n_out, targets) in _SINGLE.items():
            out[f"single_blocks.{i}.{name}"] = (n_in, n_out,
                                                tuple(f"single_transformer_blocks.{i}.{t}" for t in targets))
    out.update(_OTHER)
    return out


def tiny_lora_layers(seed: int = 0, rank: int = 4, fmt: str = "kohya") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """BFL layer name → (down, up) of a random LoRA (effective scale 1), for the layers ``fmt`` can hold."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (n_in, n_out, _) in _layout().items():
        down = 0.1 * torch.randn(rank, n_in, generator=g)
        up = 0.05 * torch.randn(n_out, rank, generator=g)
        layers[name] = (down, up)
    if fmt == "xlabs":
        layers = {k: v for k, v in layers.items()
                  if k.startswith("double_blocks.") and k.split(".", 2)[2] in _XLABS}
    return layers


def diffusers_deltas(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], strength: float = 1.0
                     ) -> dict[str, torch.Tensor]:
    """diffusers layer name → the change of its weight that merging the LoRA at ``strength`` would make."""
    layout = _layout()
    deltas = {}
    for name, (down, up) in layers.items():
        targets = layout[name][2]
        for target, part in zip(targets, (up @ down).chunk(len(targets), dim=0)):
            deltas[target] = strength * part
    return deltas


def write_tiny_lora(path: str | os.PathLike, fmt: str, seed: int = 0, rank: int = 4,
                    with_text_encoder: bool = True) -> Path:
    """Write the LoRA of :func:`tiny_lora_layers` in the layout ``fmt`` (one of :data:`LORA_FORMATS`).
    ``.safetensors`` paths are written with safetensors, others with ``torch.save``."""
    from safetensors.torch import save_file

    layers = tiny_lora_layers(seed, rank, fmt)
    sd: dict[str, torch.Tensor] = {}
    alpha = rank / 2  # kohya files carry alpha: the stored up matrix is then scaled by rank / alpha to compensate
    for name, (down, up) in layers.items():
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            if name.startswith("final_layer"):  # diffusers' converter ignores alpha there
                sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            else:
                sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up * (rank / alpha),
                           f"{key}.alpha": torch.tensor(alpha)})
        elif fmt == "comfyui":
            sd.update({f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up})
        elif fmt == "bfl":
            sd.update({f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up})
        elif fmt == "xlabs":
            block, layer = name.rsplit(".", 2)[0], _XLABS[name.split(".", 2)[2]]
            sd.update({f"{block}.processor.{layer}.down.weight": down, f"{block}.processor.{layer}.up.weight": up})
        elif fmt == "diffusers":
            targets = _layout()[name][2]
            for target, part in zip(targets, up.chunk(len(targets), dim=0)):
                sd.update({f"transformer.{target}.lora_A.weight": down, f"transformer.{target}.lora_B.weight": part})
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}; one of {LORA_FORMATS}")
    if with_text_encoder and fmt == "kohya":
        sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(rank, 32)
        sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, rank)
    if with_text_encoder and fmt == "diffusers":
        sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(rank, 32)
        sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, rank)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.clone() for k, v in sd.items()}  # no shared storage (safetensors refuses it)
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path
