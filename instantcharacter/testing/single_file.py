"""Tiny twins of the single files ComfyUI users keep, for tests and host tests.

* ``flux1-dev*.safetensors``: Black Forest Labs key layout (``double_blocks.N.img_attn.qkv.weight``, fused
  q/k/v and q/k/v/MLP, ``final_layer.adaLN_modulation`` as shift/scale), bf16, fp8 or ComfyUI "scaled fp8",
  bare or with the other three in one ComfyUI checkpoint (``model.diffusion_model.``, ``text_encoders.clip_l.``
  ``transformer.``, ``text_encoders.t5xxl.transformer.``, ``vae.``); written from a diffusers transformer by the
  inverse conversion.
* ``clip_l.safetensors`` / ``t5xxl_*.safetensors``: transformers' key names, as ComfyUI's text encoder files
  have them (CLIP with ``text_projection.weight``; T5 with ``shared.weight`` only), fp16 or fp8.
* ``ae.safetensors``: the LDM/BFL VAE layout (``encoder.down.N.block.M``, ``mid.attn_1.q`` as 1×1 convs), fp32.
* ``sigclip_vision_patch14_384.safetensors``: transformers' ``SiglipVisionModel`` keys (ComfyUI clip_vision).
* Look-alikes with the characteristic keys of other models, for the wrong-file errors.

Sizes the files do not record follow the real models' rules (CLIP heads of 64, SigLIP heads of 72, VAE
GroupNorm of 32 groups, fewer when narrower), so :func:`write_single_file_twins` edits those configs (CLIP,
VAE, SigLIP) of its diffusers reference folders to match; everything else is the ``testing`` tiny models.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files.checkpoint import FP8
from .tiny import (CLIP_TINY_DIM, FLUX_HEAD_DIM, tiny_clip_text, tiny_flux_transformer, tiny_t5, write_tiny_flux,
                   write_tiny_siglip)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    return path


def _store(tensors: dict[str, torch.Tensor], storage) -> dict[str, torch.Tensor]:
    """Cast for writing: a dtype, "fp8" (every float tensor float8_e4m3fn, as ComfyUI's fp8 files) or
    "scaled_fp8" (Linear weights divided by a per-tensor scale, ``.scale_weight`` beside them, a marker key;
    the other tensors as they are)."""
    if storage == "fp8":
        return {k: v.to(FP8) if v.is_floating_point() else v for k, v in tensors.items()}
    if storage != "scaled_fp8":
        return {k: v.to(storage) if v.is_floating_point() else v for k, v in tensors.items()}
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for k, v in tensors.items():
        if k.endswith(".weight") and v.ndim == 2 and "embed" not in k and "shared" not in k:
            scale = v.float().abs().max().clamp(min=1e-12) / 448
            out[k] = (v.float() / scale).to(FP8)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


# --- FLUX transformer: diffusers → Black Forest Labs layout -----------------------------------------------------

def bfl_flux_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The BFL (``flux1-dev.safetensors``) state dict of a diffusers ``FluxTransformer2DModel``: the loader's
    key table (:func:`single_file.bfl_sources`) run backwards. The host tests check the result against
    ComfyUI's own FLUX key map, and :func:`write_random_bfl_flux` writes the same keys and shapes by hand."""
    from ..files.single_file import bfl_sources

    sd = transformer.state_dict()
    table = bfl_sources("", transformer.inner_dim, len(transformer.transformer_blocks),
                        len(transformer.single_transformer_blocks))
    pieces: dict[str, list[tuple[int, torch.Tensor, bool]]] = {}
    for name, (key, rows, swap) in table.items():
        pieces.setdefault(key, []).append((rows[0] if rows else 0, sd[name], swap))
    out = {}
    for key, parts in pieces.items():
        parts.sort(key=lambda part: part[0])  # fused q, k, v (and mlp) rows in file order
        tensor = torch.cat([t for _, t, _ in parts])
        if parts[0][2]:  # BFL keeps shift, scale; diffusers scale, shift
            first, second = tensor.chunk(2)
            tensor = torch.cat([second, first])
        out[key] = tensor
    return out


def write_flux_file(transformer, path, storage=torch.bfloat16, prefix: str = "", drop: tuple[str, ...] = ()) -> Path:
    """``flux1-dev.safetensors`` from a diffusers transformer; ``prefix`` "model.diffusion_model." as in full
    checkpoints; ``drop``: key prefixes to leave out (e.g. "guidance_in." for a schnell look-alike)."""
    sd = {k: v for k, v in bfl_flux_state_dict(transformer).items() if not k.startswith(drop)}
    return _save({prefix + k: v for k, v in _store(sd, storage).items()}, path)


def write_random_bfl_flux(path, hidden: int = 1024, double: int = 2, single: int = 2, text_dim: int = 64,
                          pooled_dim: int = 64, dtype=torch.bfloat16, seed: int = 0) -> Path:
    """A random FLUX.1-dev-shaped BFL file of any width, without building a model (for memory tests)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name, rows, cols):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (rows, cols), (rows,)

    lin("img_in", hidden, 64)
    lin("txt_in", hidden, text_dim)
    for name, cols in (("time_in", 256), ("vector_in", pooled_dim), ("guidance_in", 256)):
        lin(f"{name}.in_layer", hidden, cols)
        lin(f"{name}.out_layer", hidden, hidden)
    for i in range(double):
        for side in ("img", "txt"):
            lin(f"double_blocks.{i}.{side}_mod.lin", 6 * hidden, hidden)
            lin(f"double_blocks.{i}.{side}_attn.qkv", 3 * hidden, hidden)
            lin(f"double_blocks.{i}.{side}_attn.proj", hidden, hidden)
            lin(f"double_blocks.{i}.{side}_mlp.0", 4 * hidden, hidden)
            lin(f"double_blocks.{i}.{side}_mlp.2", hidden, 4 * hidden)
            for n in ("query", "key"):
                shapes[f"double_blocks.{i}.{side}_attn.norm.{n}_norm.scale"] = (FLUX_HEAD_DIM,)
    for i in range(single):
        lin(f"single_blocks.{i}.modulation.lin", 3 * hidden, hidden)
        lin(f"single_blocks.{i}.linear1", 7 * hidden, hidden)
        lin(f"single_blocks.{i}.linear2", hidden, 5 * hidden)
        for n in ("query", "key"):
            shapes[f"single_blocks.{i}.norm.{n}_norm.scale"] = (FLUX_HEAD_DIM,)
    lin("final_layer.linear", 64, hidden)
    lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return _save({k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}, path)


def _under(root: str, key: str) -> str:
    """ComfyUI's files keep transformers 4's ``text_model.`` / ``vision_model.`` roots (transformers 5 dropped them)."""
    return key if key.startswith(root) else root + key


# --- text encoders -------------------------------------------------------------------------------------------

def write_clip_file(clip, path, storage=torch.float16) -> Path:
    """``clip_l.safetensors``: transformers' CLIPTextModel keys plus ``text_projection.weight``."""
    sd = {_under("text_model.", k): v for k, v in clip.state_dict().items()}
    width = clip.config.hidden_size
    sd["text_projection.weight"] = torch.eye(width, dtype=next(iter(sd.values())).dtype)
    return _save(_store(sd, storage), path)


def write_t5_file(t5, path, storage=torch.float16) -> Path:
    """``t5xxl_fp16.safetensors`` (or fp8 / scaled fp8): T5EncoderModel keys, the embedding once as
    ``shared.weight``."""
    sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return _save(_store(sd, storage), path)


# --- VAE: diffusers → LDM/BFL layout ------------------------------------------------------------------------------

def ldm_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """The ``ae.safetensors`` state dict of a diffusers ``AutoencoderKL``."""
    levels = len(vae.config.block_out_channels)
    renames = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for key, value in vae.state_dict().items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1×1 convolutions
        out[key] = value
    return out


def write_vae_file(vae, path, storage=torch.float32) -> Path:
    return _save(_store(ldm_vae_state_dict(vae), storage), path)


def write_comfyui_checkpoint(path, transformer, clip, t5, vae, storage=torch.bfloat16) -> Path:
    """One file holding all four, under the prefixes ComfyUI's CheckpointSave gives FLUX: model.diffusion_model.,
    text_encoders.clip_l.transformer., text_encoders.t5xxl.transformer., vae. (LDM layout)."""
    parts = {"model.diffusion_model.": bfl_flux_state_dict(transformer),
             "text_encoders.clip_l.transformer.": {_under("text_model.", k): v for k, v in clip.state_dict().items()},
             "text_encoders.t5xxl.transformer.": {k: v for k, v in t5.state_dict().items()
                                                  if k != "encoder.embed_tokens.weight"},
             "vae.": ldm_vae_state_dict(vae)}
    return _save(_store({prefix + k: v for prefix, sd in parts.items() for k, v in sd.items()}, storage), path)


# --- SigLIP --------------------------------------------------------------------------------------------------------

def write_siglip_file(siglip_vision, path, storage=torch.float16, head: bool = True) -> Path:
    """``sigclip_vision_patch14_384.safetensors`` from a transformers SiglipVisionModel (``head``: keep the
    pooling head's weights)."""
    sd = {_under("vision_model.", k): v for k, v in siglip_vision.state_dict().items()
          if head or not _under("vision_model.", k).startswith("vision_model.head.")}
    return _save(_store(sd, storage), path)


# --- whole sets ---------------------------------------------------------------------------------------------------

def _edit_config(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    target = data.get("vision_config", data)
    target.update(values)
    path.write_text(json.dumps(data, indent=2))


def write_single_file_twins(root: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """A diffusers reference folder (the ``testing`` tiny FLUX, CLIP heads and VAE groups set by the rules
    above) and the same weights as ComfyUI single files, in a ComfyUI-like models tree.

    Keys: folder, clip_tokenizer, t5_tokenizer; transformer (bf16), transformer_fp8, transformer_scaled_fp8;
    checkpoint (all four in one file, as ComfyUI's CheckpointSave writes FLUX; bf16); clip (fp16), clip_bf16
    (bit-exact copies of the folder's weights; fp16 rounds a few tiny values); t5 (fp16), t5_bf16, t5_fp8,
    t5_scaled_fp8; vae (fp32, LDM layout); siglip_folder, siglip (fp16 file of the folder's vision tower)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, SiglipVisionModel, T5EncoderModel

    root = Path(root)
    folder = write_tiny_flux(root / "unet" / "FLUX.1-dev", seed)
    _edit_config(folder / "text_encoder" / "config.json", num_attention_heads=max(1, CLIP_TINY_DIM // 64))
    widths = json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]
    _edit_config(folder / "vae" / "config.json", norm_num_groups=math.gcd(32, *widths))
    siglip_folder = write_tiny_siglip(root / "clip_vision" / "siglip-so400m-patch14-384", seed)
    width = json.loads((siglip_folder / "config.json").read_text())["vision_config"]["hidden_size"]
    _edit_config(siglip_folder / "config.json", num_attention_heads=max(1, width // 72))

    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    siglip = SiglipVisionModel.from_pretrained(siglip_folder)
    unet, te = root / "unet", root / "text_encoders"
    return {
        "folder": folder, "clip_tokenizer": folder / "tokenizer", "t5_tokenizer": folder / "tokenizer_2",
        "transformer": write_flux_file(transformer, unet / "flux1-dev.safetensors"),
        "transformer_fp8": write_flux_file(transformer, unet / "flux1-dev-fp8-e4m3fn.safetensors", "fp8"),
        "transformer_scaled_fp8": write_flux_file(transformer, unet / "flux1-dev-fp8-scaled.safetensors",
                                                  "scaled_fp8"),
        "checkpoint": write_comfyui_checkpoint(root / "checkpoints" / "flux1-dev-all-in-one.safetensors",
                                               transformer, clip, t5, vae),
        "clip": write_clip_file(clip, te / "clip_l.safetensors"),
        "clip_bf16": write_clip_file(clip, te / "clip_l_bf16.safetensors", torch.bfloat16),
        "t5": write_t5_file(t5, te / "t5xxl_fp16.safetensors"),
        "t5_bf16": write_t5_file(t5, te / "t5xxl_bf16.safetensors", torch.bfloat16),
        "t5_fp8": write_t5_file(t5, te / "t5xxl_fp8_e4m3fn.safetensors", "fp8"),
        "t5_scaled_fp8": write_t5_file(t5, te / "t5xxl_fp8_e4m3fn_scaled.safetensors", "scaled_fp8"),
        "vae": write_vae_file(vae, root / "vae" / "ae.safetensors"),
        "siglip_folder": siglip_folder,
        "siglip": write_siglip_file(siglip, root / "clip_vision" / "sigclip_vision_patch14_384.safetensors"),
    }


def write_comfyui_text_encoders(root: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Tiny ``clip_l.safetensors`` and ``t5xxl_fp16.safetensors`` whose vocabularies fit ComfyUI's own
    tokenizers (49408 CLIP tokens, 32128 T5 rows), at the ``testing`` tiny widths, and a tiny
    ``flux1-dev.safetensors`` that reads them (for host tests, where the tokenizers come from ComfyUI)."""
    root = Path(root)
    # 49408 = 49406 tokens + start + end, the ids CLIP's own tokenizer gives them
    clip = tiny_clip_text(49408, seed, heads=max(1, CLIP_TINY_DIM // 64))
    t5 = tiny_t5(32128, seed)
    transformer = tiny_flux_transformer(seed)
    return {
        "transformer": write_flux_file(transformer, root / "unet" / "flux1-dev-tiny.safetensors"),
        "transformer_fp8": write_flux_file(transformer, root / "unet" / "flux1-dev-tiny-fp8.safetensors", "fp8"),
        "clip": write_clip_file(clip, root / "text_encoders" / "clip_l_tiny.safetensors"),
        "t5": write_t5_file(t5, root / "text_encoders" / "t5xxl_tiny_fp16.safetensors"),
        "t5_fp8": write_t5_file(t5, root / "text_encoders" / "t5xxl_tiny_fp8_e4m3fn.safetensors", "fp8"),
    }


# --- look-alikes of other models (characteristic keys, tiny shapes) -------------------------------------------

def _tiny(shapes: dict[str, tuple[int, ...]], dtype=torch.float16) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}


def write_lookalikes(folder: str | os.PathLike, flux_twin: str | os.PathLike | None = None) -> dict[str, Path]:
    """Files that are not what a slot expects. ``flux_twin`` (a BFL file) gives the schnell/Fill variants."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out: dict[str, Path] = {}
    if flux_twin is not None:
        flux = load_file(str(flux_twin))
        out["flux_schnell"] = _save({k: v for k, v in flux.items() if not k.startswith("guidance_in.")},
                                    folder / "flux1-schnell.safetensors")
        fill = dict(flux, **{"img_in.weight": torch.zeros(flux["img_in.weight"].shape[0], 384)})
        out["flux_fill"] = _save(fill, folder / "flux1-fill-dev.safetensors")
    dm = "model.diffusion_model."
    out["sd3"] = _save(_tiny({f"{dm}joint_blocks.0.context_block.attn.qkv.weight": (24, 8),
                              f"{dm}x_embedder.proj.weight": (8, 16, 2, 2), f"{dm}pos_embed": (1, 16, 8)}),
                       folder / "sd3.5_medium.safetensors")
    out["sdxl"] = _save(_tiny({f"{dm}input_blocks.0.0.weight": (8, 4, 3, 3), f"{dm}label_emb.0.0.weight": (8, 16),
                               "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
                               "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}),
                        folder / "sd_xl_base_1.0.safetensors")
    clip_g = {f"text_model.encoder.layers.{i}.self_attn.q_proj.weight": (8, 8) for i in range(32)}
    clip_g.update({f"text_model.encoder.layers.{i}.mlp.fc1.weight": (16, 8) for i in range(32)})
    out["clip_g"] = _save(_tiny(clip_g), folder / "clip_g.safetensors")
    t5_old = {"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8),
              "encoder.block.0.layer.1.DenseReluDense.wi.weight": (16, 8), "shared.weight": (32, 8)}
    out["t5_v1_0"] = _save(_tiny(t5_old), folder / "t5_base_v1_0.safetensors")
    out["vae_sdxl"] = _save(_tiny({"decoder.conv_in.weight": (8, 4, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3),
                                   "quant_conv.weight": (8, 8, 1, 1)}), folder / "sdxl_vae.safetensors")
    clip_vision = {"vision_model.embeddings.class_embedding": (1024,),
                   "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
                   "vision_model.embeddings.position_embedding.weight": (257, 1024)}
    clip_vision.update({f"vision_model.encoder.layers.{i}.layer_norm1.weight": (1024,) for i in range(24)})
    out["clip_vision_l"] = _save(_tiny(clip_vision), folder / "clip_vision_l.safetensors")
    siglip2 = {"vision_model.embeddings.patch_embedding.weight": (1152, 3, 16, 16),
               "vision_model.embeddings.position_embedding.weight": (1024, 1152)}
    siglip2.update({f"vision_model.encoder.layers.{i}.layer_norm1.weight": (1152,) for i in range(27)})
    out["siglip2_512"] = _save(_tiny(siglip2), folder / "siglip2_so400m_patch16_512.safetensors")
    naflex = dict(siglip2, **{"vision_model.embeddings.patch_embedding.weight": (1152, 768),
                              "vision_model.embeddings.position_embedding.weight": (256, 1152)})
    out["siglip2_naflex"] = _save(_tiny(naflex), folder / "siglip2_so400m_naflex.safetensors")
    return out
