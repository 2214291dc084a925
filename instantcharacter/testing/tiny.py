"""Tiny random models in the real on-disk layouts, for tests, host tests and ``doctor --selftest``.

Every writer is deterministic (seeded) and fast. The layouts are the ones users download:

* a diffusers FLUX.1-dev folder (sharded transformer and T5 like the Hub repo, working CLIP and T5
  tokenizers built here, FLUX VAE config with tiny widths, the real scheduler config);
* SigLIP so400m-384 and DINOv2-giant folders with the real layer counts and image sizes, tiny widths;
* an adapter ``.bin`` with the published key names at tiny shapes.

The FLUX attention heads are 128 wide, as in the real model: the character-attention norms are per head.
Weights are stored in bf16, as on the Hub. Nothing here is a usable model: the weights are random.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import torch

FLUX_TINY_HEADS = 2
FLUX_HEAD_DIM = 128
FLUX_TINY_DOUBLE = 2
FLUX_TINY_SINGLE = 3
T5_TINY_DIM = 32
CLIP_TINY_DIM = 32
SIGLIP_TINY_WIDTH = 48
DINO_TINY_WIDTH = 80
ADAPTER_TINY_QUERIES = 16
ADAPTER_TINY_RESAMPLER = 128

FLUX_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
_WORDS = ("a an the of and in on at with girl boy woman man cat dog red blue green golden hair dress coat "
          "forest beach castle library city light photo picture portrait character standing walking reading "
          "book knight armour sunset oil painting watercolour test cosy warm detailed illustration scene style "
          "smiling wearing holding under over night day sky river mountain").split()


def randomize(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Small random weights; norm scales near 1 so activations keep their size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("scale") or "layer_norm" in name):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


# --- tokenizers -------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(folder: Path) -> int:
    """A byte-level BPE CLIP tokenizer (vocab.json, merges.txt) that tokenizes any text. Returns its size."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in _WORDS[:40]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if f"{pair[0]} {pair[1]}" not in merges:
                merges.append(f"{pair[0]} {pair[1]}")
                vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                   "do_lower_case": True, **special})
    return len(vocab)


def write_t5_tokenizer(folder: Path, seed: int = 0) -> int:
    """A sentencepiece unigram T5 tokenizer trained here on a synthetic corpus: spiece.model plus the
    tokenizer.json the fast tokenizer reads, with T5's 100 extra ids. Returns its size."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(500)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=96, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(folder)
    _write_json(folder / "special_tokens_map.json", {
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]})
    return len(tokenizer)


# --- FLUX ----------------------------------------------------------------------------------------------------

def tiny_flux_transformer(seed: int = 0):
    """The tiny FLUX.1-dev transformer (fp32, random): heads of 128, every test model's FLUX."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=FLUX_TINY_DOUBLE, num_single_layers=FLUX_TINY_SINGLE,
        attention_head_dim=FLUX_HEAD_DIM, num_attention_heads=FLUX_TINY_HEADS, joint_attention_dim=T5_TINY_DIM,
        pooled_projection_dim=CLIP_TINY_DIM, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    randomize(transformer, seed + 3)
    return transformer


def tiny_clip_text(vocab: int, seed: int = 0, heads: int = 2):
    """A tiny CLIP-L text tower for a tokenizer of ``vocab`` tokens (start/end tokens last, as in CLIP's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=CLIP_TINY_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=CLIP_TINY_DIM,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    randomize(clip, seed + 1)
    return clip


def tiny_t5(vocab: int, seed: int = 0):
    """A tiny T5 v1.1 encoder (gated GELU) for a tokenizer of ``vocab`` tokens."""
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=T5_TINY_DIM, d_kv=16, d_ff=64, num_layers=2,
                                 num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, use_cache=False))
    randomize(t5, seed + 2)
    return t5


def write_tiny_flux(path: str | os.PathLike, seed: int = 0) -> Path:
    """A diffusers FLUX.1-dev folder with tiny random weights (see module docstring)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    clip_vocab = write_clip_tokenizer(path / "tokenizer")
    t5_vocab = write_t5_tokenizer(path / "tokenizer_2", seed)
    _write_json(path / "scheduler" / "scheduler_config.json", FLUX_SCHEDULER_CONFIG)

    tiny_clip_text(clip_vocab, seed).to(torch.bfloat16).save_pretrained(path / "text_encoder")
    tiny_t5(t5_vocab, seed).to(torch.bfloat16).save_pretrained(path / "text_encoder_2", max_shard_size="20KB")
    tiny_flux_transformer(seed).to(torch.bfloat16).save_pretrained(path / "transformer", max_shard_size="4MB")

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    randomize(vae, seed + 4, std=0.1)
    vae.to(torch.bfloat16).save_pretrained(path / "vae")

    _write_json(path / "model_index.json", {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    return path


# --- image encoders ------------------------------------------------------------------------------------------

def write_tiny_siglip(path: str | os.PathLike, seed: int = 0) -> Path:
    """A google/siglip-so400m-patch14-384-shaped folder: full SigLIP config and weights (vision + text),
    27 vision layers at 384² / patch 14 (729 tokens), width 48."""
    from transformers import SiglipConfig, SiglipModel

    path = Path(path)
    config = SiglipConfig(
        vision_config=dict(hidden_size=SIGLIP_TINY_WIDTH, intermediate_size=96, num_hidden_layers=27,
                           num_attention_heads=2, image_size=384, patch_size=14),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=1))
    model = SiglipModel(config)
    randomize(model, seed + 10, std=0.05)
    model.save_pretrained(path)
    _write_json(path / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": 384, "width": 384}})
    return path


def write_tiny_dinov2(path: str | os.PathLike, seed: int = 0) -> Path:
    """A facebook/dinov2-giant-shaped folder: 40 layers, SwiGLU FFN, patch 14, image size 518, width 80."""
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    config = Dinov2Config(hidden_size=DINO_TINY_WIDTH, num_hidden_layers=40, num_attention_heads=2, mlp_ratio=2,
                          patch_size=14, image_size=518, use_swiglu_ffn=True, layerscale_value=1.0)
    model = Dinov2Model(config)
    randomize(model, seed + 20, std=0.05)
    model.save_pretrained(path)
    _write_json(path / "preprocessor_config.json", {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 256}})
    return path


# --- adapter -------------------------------------------------------------------------------------------------

def tiny_adapter_config():
    from ..model.projector import ProjectorConfig

    feature = SIGLIP_TINY_WIDTH + DINO_TINY_WIDTH
    return ProjectorConfig(feature_dim=feature, num_blocks=4, ff_inner_dim=4 * feature, mlp_hidden_dim=2 * feature,
                           resampler_dim=ADAPTER_TINY_RESAMPLER, resampler_depth=4,
                           resampler_ff_dim=4 * ADAPTER_TINY_RESAMPLER, num_queries=ADAPTER_TINY_QUERIES,
                           token_dim=T5_TINY_DIM)


def write_tiny_adapter(path: str | os.PathLike, seed: int = 0) -> Path:
    """An adapter checkpoint with the published key names at tiny shapes, for the tiny FLUX above.
    ``.bin``: the published nested pickle; ``.safetensors``: the same tensors, flat."""
    from ..files.adapter_file import save_adapter
    from ..model.adapter import InstantCharacterAdapter

    path = Path(path)
    adapter = InstantCharacterAdapter(tiny_adapter_config(), FLUX_TINY_DOUBLE + FLUX_TINY_SINGLE,
                                       FLUX_TINY_HEADS * FLUX_HEAD_DIM)
    randomize(adapter, seed + 30, std=0.05)
    with torch.no_grad():
        adapter.image_proj.resampler.latents.normal_(0, 1, generator=torch.Generator().manual_seed(seed + 31))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter.to(torch.bfloat16), path)  # the published file is bf16
    return path


def write_tiny_models(root: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """All four into a ComfyUI-like models tree; returns their paths (keys flux, siglip, dinov2, adapter)."""
    root = Path(root)
    return {
        "flux": write_tiny_flux(root / "unet" / "FLUX.1-dev", seed),
        "siglip": write_tiny_siglip(root / "clip_vision" / "siglip-so400m-patch14-384", seed),
        "dinov2": write_tiny_dinov2(root / "clip_vision" / "dinov2-giant", seed),
        "adapter": write_tiny_adapter(root / "ipadapter" / "instantcharacter_ip-adapter.bin", seed),
    }
