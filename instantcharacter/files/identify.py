"""What a checkpoint is, from its key names and shapes alone: for messages that name a wrong pick."""

from __future__ import annotations

import functools
import os

from ..errors import ModelFolderError
from .checkpoint import TensorFile, open_tensors


def describe(path: str | os.PathLike | TensorFile) -> str:
    """What a checkpoint looks like, from its key names and shapes: 'a FLUX.1-schnell transformer (bf16)'."""
    f = open_tensors(path)
    try:
        kind = _kind(f)
    except (IndexError, ValueError, TypeError):  # the key names of a model, but tensors of other ranks
        kind = f"an unrecognised model whose tensors have unusual shapes ({len(f.keys)} tensors)"
    return f"{kind} ({f.precision()})"


def shapes_checked(need: str, hint: str):
    """For a function that reads a model's sizes from a file's tensor shapes: a file with the right key names but
    tensors of other ranks (an index or an unpacking that fails) is refused as not ``need``, by name, instead of
    an IndexError."""
    def decorate(inspect):
        @functools.wraps(inspect)
        def checked(path):
            f = open_tensors(path)
            try:
                return inspect(f)
            except (IndexError, ValueError, TypeError) as err:
                raise wrong_file(f, need, hint, "Its tensors do not have the shapes of that model.") from err
        return checked
    return decorate


def _kind(f: TensorFile) -> str:
    p = f.find_prefix("double_blocks.0.img_attn.qkv.weight")
    if p is not None:
        where = " inside a full checkpoint" if p else ""
        chroma = f.find_prefix("distilled_guidance_layer.norms.0.scale") is not None
        if chroma or f"{p}vector_in.in_layer.weight" not in f:
            return f"a Chroma transformer{where}"
        channels = f.shape(f"{p}img_in.weight")[1] if f"{p}img_in.weight" in f else 64
        if channels == 384:
            return f"a FLUX.1 Fill transformer{where}"
        if channels == 128:
            return f"a FLUX.1 Depth or Canny transformer{where}"
        if f"{p}guidance_in.in_layer.weight" not in f:
            return f"a FLUX.1-schnell transformer (no guidance_in weights){where}"
        return f"a FLUX.1-dev transformer{where}"
    if f.find_prefix("single_transformer_blocks.0.attn.to_q.weight") is not None:
        return "a FLUX transformer in diffusers layout"
    if f.find_prefix("joint_blocks.0.context_block.attn.qkv.weight") is not None:
        return "a Stable Diffusion 3 / 3.5 model (MMDiT)"
    p = f.find_prefix("input_blocks.0.0.weight")
    if p is not None:
        return "an SDXL UNet or checkpoint" if f"{p}label_emb.0.0.weight" in f else "an SD 1.x / 2.x UNet or checkpoint"
    if f.find_prefix("down_blocks.0.resnets.0.conv1.weight") is not None and \
            f.find_prefix("time_embedding.linear_1.weight") is not None:
        return "a UNet in diffusers layout"
    p = f.find_prefix("encoder.block.0.layer.0.SelfAttention.q.weight")
    if p is not None:
        width = f.shape(f"{p}encoder.block.0.layer.0.SelfAttention.q.weight")[1]
        name = {4096: "T5-XXL", 2048: "T5-XL", 1024: "T5-large", 768: "T5-base"}.get(width, f"T5 (width {width})")
        if f"{p}encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in f:
            name = "umT5" if width != 4096 else "umT5-XXL"
        return f"a {name} text encoder"
    p = f.find_prefix("text_model.encoder.layers.0.self_attn.q_proj.weight")
    if p is not None:
        layers = f.count(f"{p}text_model.encoder.layers.")
        name = "CLIP-G (bigG)" if layers >= 32 else "CLIP-H" if layers >= 23 else "CLIP-L"
        return f"a {name} text encoder"
    if f.find_prefix("model.layers.0.self_attn.q_proj.weight") is not None:
        return "a large language model (the text encoder of another model family)"
    p = f.find_prefix("decoder.conv_in.weight")
    if p is not None:
        channels = f.shape(f"{p}decoder.conv_in.weight")[1]
        if channels == 16:
            return "a 16-channel VAE (FLUX.1 ae.safetensors or SD3)"
        if channels == 4:
            return "an SD 1.x / SDXL VAE (4 latent channels)"
        return f"a VAE with {channels} latent channels"
    p = f.find_prefix("vision_model.encoder.layers.0.layer_norm1.weight")
    if p is not None:
        return _vision_kind(f, p)
    if f.find_prefix("encoder.layer.0.layer_scale1.lambda1") is not None:
        return "a DINOv2 image encoder"
    if any("lora_" in k or ".lora." in k for k in f.keys):
        return "a LoRA"
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in f.keys):
        return "an IP-Adapter"
    example = f.keys[0] if f.keys else "no tensors"
    return f"an unrecognised model ({len(f.keys)} tensors, e.g. {example})"


def _vision_kind(f: TensorFile, p: str) -> str:
    layers = f.count(f"{p}vision_model.encoder.layers.")
    width = f.shape(f"{p}vision_model.encoder.layers.0.layer_norm1.weight")[0]
    if f"{p}vision_model.embeddings.class_embedding" in f:
        name = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14"}.get(width, "CLIP")
        return f"a {name} vision encoder"
    patch = f.shape(f"{p}vision_model.embeddings.patch_embedding.weight")
    positions = f.shape(f"{p}vision_model.embeddings.position_embedding.weight")[0]
    if len(patch) != 4:
        return "a SigLIP 2 NaFlex vision encoder"
    family = "SigLIP 2" if patch[-1] == 16 else "SigLIP"
    size = "so400m" if width == 1152 else f"width {width}"
    pixels = {729: 384, 1024: 512, 576: 384, 256: 256 if patch[-1] == 16 else 224}.get(positions)
    where = f"{pixels} px" if pixels else f"{positions} positions"
    return f"a {family} {size} vision encoder (patch {patch[-1]}, {where}, {layers} layers)"


def wrong_file(f: TensorFile, need: str, hint: str, detail: str = "") -> ModelFolderError:
    detail = f" {detail}" if detail else ""
    return ModelFolderError(f"{f.name} is not {need}: it looks like {describe(f)}.{detail} {hint}")
