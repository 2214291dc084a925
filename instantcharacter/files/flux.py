"""The two ways to build the FLUX.1-dev pipeline: from a diffusers folder, or from ComfyUI's single files.

Both give a ``diffusers.FluxPipeline``, used as a component container (transformer, text encoders and their
tokenizers, VAE, scheduler); the denoising loop is ours (:mod:`..run.pipeline`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelFolderError
from .checkpoint import short_error
from .hub import missing_flux_files
from .single_file import (CLIP_HINT, T5_HINT, inspect_clip_text, inspect_flux_transformer, inspect_flux_vae,
                          inspect_t5, load_clip_text, load_flux_transformer, load_flux_vae, load_t5_encoder,
                          shipped_config)


def load_flux(folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16):
    """Load a diffusers FLUX.1-dev folder as a ``diffusers.FluxPipeline`` (used as a component container)."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelFolderError(
            f"{folder} is not a diffusers FLUX folder (no model_index.json). Put the diffusers version of "
            "black-forest-labs/FLUX.1-dev there (its model_index.json and the scheduler, text_encoder, "
            "text_encoder_2, tokenizer, tokenizer_2, transformer and vae folders)."
        )
    missing = missing_flux_files(folder)
    if missing:
        raise ModelFolderError(
            f"{folder} is incomplete: {len(missing)} required file(s) missing, e.g. {', '.join(missing[:3])}. "
            "Download it again (downloads resume) or copy the missing files."
        )
    from diffusers import FluxTransformer2DModel

    try:
        # the transformer on its own first: diffusers only logs weights the files lack and leaves them random
        transformer, info = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype,
                                                                   output_loading_info=True)
        missing = info.get("missing_keys") or []
        if missing:
            raise ModelFolderError(
                f"{folder / 'transformer'} lacks {len(missing)} weight(s) its config.json needs (e.g. "
                f"{', '.join(sorted(missing)[:3])}): the config and the weights do not belong together. Download "
                "the folder again.")
        pipe = FluxPipeline.from_pretrained(folder, transformer=transformer, torch_dtype=dtype)
    except ModelFolderError:
        raise
    except Exception as err:  # noqa: BLE001 - JSON, shard, pickle and OS errors all mean a damaged folder
        raise ModelFolderError(f"{folder} could not be loaded ({type(err).__name__}: {short_error(err)}): a file is "
                               "damaged or incomplete. Download the folder again (downloads resume).") from err
    if not pipe.transformer.config.guidance_embeds:
        raise ModelFolderError(
            f"{folder} holds a FLUX model without guidance embedding (FLUX.1-schnell?); "
            "InstantCharacter was trained on FLUX.1-dev."
        )
    return pipe


def _tokenizers(clip_dir, t5_dir, clip_length: int):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_dir, t5_dir = Path(clip_dir), Path(t5_dir)
    if not ((clip_dir / "vocab.json").is_file() and (clip_dir / "merges.txt").is_file()):
        raise ModelFolderError(f"{clip_dir} is not a CLIP tokenizer folder (vocab.json and merges.txt); ComfyUI "
                               "ships one in comfy/sd1_tokenizer.")
    if not ((t5_dir / "tokenizer.json").is_file() or (t5_dir / "spiece.model").is_file()):
        raise ModelFolderError(f"{t5_dir} is not a T5 tokenizer folder (tokenizer.json or spiece.model); ComfyUI "
                               "ships one in comfy/text_encoders/t5_tokenizer.")
    return (CLIPTokenizer.from_pretrained(clip_dir, model_max_length=clip_length),
            T5TokenizerFast.from_pretrained(t5_dir))


def assemble_flux(transformer_file, clip_file, t5_file, vae_file, clip_tokenizer_dir, t5_tokenizer_dir,
                  dtype: torch.dtype = torch.bfloat16, fp8_storage: bool | None = False):
    """The ``FluxPipeline`` :func:`load_flux` gives, from ComfyUI's single files.

    Every file is checked (headers only) before any weights are read, so a wrong pick fails at once with a
    message naming the file and what it looks like. ``fp8_storage``: see :func:`load_flux_transformer`; it
    applies to the transformer and T5 (None: fp8 for whichever file is fp8)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    flux_config, _, _ = inspect_flux_transformer(transformer_file)
    clip_config, _ = inspect_clip_text(clip_file)
    t5_config, _, _ = inspect_t5(t5_file)
    inspect_flux_vae(vae_file)
    names = {k: Path(v).name for k, v in (("flux", transformer_file), ("clip", clip_file), ("t5", t5_file))}
    if t5_config["d_model"] != flux_config["joint_attention_dim"]:
        raise ModelFolderError(
            f"{names['t5']} gives text features of width {t5_config['d_model']}, but {names['flux']} expects "
            f"{flux_config['joint_attention_dim']} (T5-XXL). {T5_HINT}")
    if clip_config["hidden_size"] != flux_config["pooled_projection_dim"]:
        raise ModelFolderError(
            f"{names['clip']} gives pooled features of width {clip_config['hidden_size']}, but {names['flux']} "
            f"expects {flux_config['pooled_projection_dim']} (CLIP-L). {CLIP_HINT}")
    clip_tokenizer, t5_tokenizer = _tokenizers(clip_tokenizer_dir, t5_tokenizer_dir,
                                               clip_config["max_position_embeddings"])
    for tokenizer, config, key, name in ((clip_tokenizer, clip_config, "vocab_size", names["clip"]),
                                         (t5_tokenizer, t5_config, "vocab_size", names["t5"])):
        if len(tokenizer) > config[key]:
            raise ModelFolderError(f"The tokenizer has {len(tokenizer)} tokens but {name} embeds only {config[key]}: "
                                   "the text encoder does not belong to this tokenizer.")

    transformer = load_flux_transformer(transformer_file, dtype, fp8_storage)
    clip = load_clip_text(clip_file, dtype, clip_tokenizer)
    t5 = load_t5_encoder(t5_file, dtype, fp8_storage)
    vae = load_flux_vae(vae_file, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(shipped_config("flux1_dev_scheduler.json"))
    return FluxPipeline(scheduler=scheduler, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
                        tokenizer_2=t5_tokenizer, transformer=transformer, vae=vae)
