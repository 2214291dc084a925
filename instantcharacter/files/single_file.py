"""FLUX.1-dev's parts and SigLIP from the single files ComfyUI users already have.

ComfyUI users keep FLUX.1-dev as ``flux1-dev*.safetensors`` (Black Forest Labs key layout, bf16 or fp8, bare
or under ``model.diffusion_model.``), ``clip_l.safetensors``, ``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn.safetensors``
and ``ae.safetensors``, and often the SigLIP of FLUX Redux (``sigclip_vision_patch14_384.safetensors``). Each
``inspect_*`` checks a file from its header and reads its config from the tensors (the rest ships in
``configs/``); each ``load_*`` builds the model with no network access, so tiny test twins load through the
same code.

Tensors are read one at a time and converted on the way into an empty (meta) model, so the peak memory is
the finished model plus one tensor. With fp8 storage the Linear weights of the transformer blocks (and of
T5) stay float8_e4m3fn and are used in the compute dtype (:class:`~.building.Fp8Linear`); a bf16 copy of the
model is never made. ComfyUI's "scaled fp8" files (``scale_weight`` per layer) keep their fp8 values and scales
when stored as fp8, and are de-scaled when converted to the compute dtype.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .building import Source, empty_model, fill, hf_sources, storage_plan, use_fp8, wants_fp8
from .checkpoint import TensorDict, open_tensors
from .identify import shapes_checked, wrong_file

CONFIGS = Path(__file__).resolve().parent / "configs"

FLUX_HINT = "Pick flux1-dev.safetensors (or an fp8 flux1-dev) from models/diffusion_models or models/unet."
CLIP_HINT = "Pick clip_l.safetensors from models/text_encoders (models/clip)."
T5_HINT = "Pick t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors from models/text_encoders (models/clip)."
VAE_HINT = "Pick ae.safetensors (the FLUX.1 VAE) from models/vae."
SIGLIP_HINT = ("Pick sigclip_vision_patch14_384.safetensors (the SigLIP of FLUX Redux) from models/clip_vision, "
               "or the google/siglip-so400m-patch14-384 folder.")


def shipped_config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text(encoding="utf-8"))


# --- FLUX transformer ---------------------------------------------------------------------------------------

_FLUX_PROBES = {
    "bfl": dict(img_in="img_in.weight", txt_in="txt_in.weight", vec_in="vector_in.in_layer.weight",
                guidance="guidance_in.in_layer.weight", head_norm="double_blocks.0.img_attn.norm.query_norm.scale",
                mlp_in="double_blocks.0.img_mlp.0.weight", final="final_layer.linear.weight",
                double="double_blocks.", single="single_blocks."),
    "diffusers": dict(img_in="x_embedder.weight", txt_in="context_embedder.weight",
                      vec_in="time_text_embed.text_embedder.linear_1.weight",
                      guidance="time_text_embed.guidance_embedder.linear_1.weight",
                      head_norm="transformer_blocks.0.attn.norm_q.weight",
                      mlp_in="transformer_blocks.0.ff.net.0.proj.weight", final="proj_out.weight",
                      double="transformer_blocks.", single="single_transformer_blocks."),
}


@shapes_checked("a FLUX.1-dev transformer", FLUX_HINT)
def inspect_flux_transformer(path) -> tuple[dict, dict[str, Source], str]:
    """Check a FLUX.1-dev transformer file and read its config from the tensors (no weights are loaded).
    Returns (diffusers config, parameter name → source in the file, the file's probe key for its precision)."""
    f = open_tensors(path)
    prefix = f.find_prefix("double_blocks.0.img_attn.qkv.weight")
    layout = "bfl"
    if prefix is None:
        prefix, layout = f.find_prefix("single_transformer_blocks.0.attn.to_q.weight"), "diffusers"
    probe = {k: (prefix or "") + v for k, v in _FLUX_PROBES[layout].items()}
    norm_suffix = "scale"
    if layout == "bfl" and probe["head_norm"] not in f:  # saved by a ComfyUI that names the q/k norms' scale "weight"
        norm_suffix = "weight"
        probe["head_norm"] = probe["head_norm"][: -len("scale")] + "weight"
    if prefix is None or probe["img_in"] not in f or probe["vec_in"] not in f or probe["head_norm"] not in f:
        raise wrong_file(f, "a FLUX.1-dev transformer", FLUX_HINT)
    hidden, channels = f.shape(probe["img_in"])
    if channels != 64 or probe["guidance"] not in f:
        raise wrong_file(f, "a FLUX.1-dev transformer", FLUX_HINT,
                     "InstantCharacter was trained on the plain FLUX.1-dev (64 input channels, guidance embedding).")
    head_dim = f.shape(probe["head_norm"])[0]
    config = shipped_config("flux1_dev_transformer.json")
    if f.shape(probe["mlp_in"])[0] != 4 * hidden or hidden % head_dim or sum(config["axes_dims_rope"]) != head_dim:
        raise wrong_file(f, "a FLUX.1-dev transformer", FLUX_HINT,
                     f"Its sizes (width {hidden}, heads of {head_dim}) are not FLUX.1's.")
    config.update(in_channels=channels, num_layers=f.count(probe["double"]), num_single_layers=f.count(probe["single"]),
                  attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
                  joint_attention_dim=f.shape(probe["txt_in"])[1], pooled_projection_dim=f.shape(probe["vec_in"])[1],
                  guidance_embeds=True)
    out = f.shape(probe["final"])[0]
    config["out_channels"] = None if out == channels else out
    config.pop("_class_name", None)
    if layout == "diffusers":
        sources = None  # identity, filled in by load_flux_transformer from the model's own names
    else:
        sources = bfl_sources(prefix, hidden, config["num_layers"], config["num_single_layers"], norm_suffix)
    weight_probe = probe["double"] + "0.img_attn.qkv.weight" if layout == "bfl" else probe["mlp_in"]
    return config, sources, weight_probe


def bfl_sources(p: str, hidden: int, n_double: int, n_single: int, norm_suffix: str = "scale") -> dict[str, Source]:
    """diffusers FluxTransformer2DModel parameter → (BFL key, rows, swap halves). The q/k norms' parameter is
    ``scale`` in BFL files, ``weight`` in files saved by newer ComfyUI versions."""
    out: dict[str, Source] = {}

    def lin(dst: str, src: str, rows: tuple[int, int] | None = None, swap: bool = False):
        for end in ("weight", "bias"):
            out[f"{dst}.{end}"] = (f"{p}{src}.{end}", rows, swap)

    def thirds(dst_block: str, names: tuple[str, str, str], src: str):
        for j, name in enumerate(names):
            lin(f"{dst_block}.{name}", src, (j * hidden, (j + 1) * hidden))

    def norm(dst: str, src: str):
        out[f"{dst}.weight"] = (f"{p}{src}.{norm_suffix}", None, False)

    lin("x_embedder", "img_in")
    lin("context_embedder", "txt_in")
    for dst, src in (("timestep", "time_in"), ("text", "vector_in"), ("guidance", "guidance_in")):
        lin(f"time_text_embed.{dst}_embedder.linear_1", f"{src}.in_layer")
        lin(f"time_text_embed.{dst}_embedder.linear_2", f"{src}.out_layer")
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        lin(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        thirds(f"{d}.attn", ("to_q", "to_k", "to_v"), f"{b}.img_attn.qkv")
        thirds(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{b}.txt_attn.qkv")
        norm(f"{d}.attn.norm_q", f"{b}.img_attn.norm.query_norm")
        norm(f"{d}.attn.norm_k", f"{b}.img_attn.norm.key_norm")
        norm(f"{d}.attn.norm_added_q", f"{b}.txt_attn.norm.query_norm")
        norm(f"{d}.attn.norm_added_k", f"{b}.txt_attn.norm.key_norm")
        lin(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        lin(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
        lin(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        lin(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        lin(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        lin(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        lin(f"{d}.norm.linear", f"{b}.modulation.lin")
        thirds(f"{d}.attn", ("to_q", "to_k", "to_v"), f"{b}.linear1")
        lin(f"{d}.proj_mlp", f"{b}.linear1", (3 * hidden, 7 * hidden))
        lin(f"{d}.proj_out", f"{b}.linear2")
        norm(f"{d}.attn.norm_q", f"{b}.norm.query_norm")
        norm(f"{d}.attn.norm_k", f"{b}.norm.key_norm")
    lin("proj_out", "final_layer.linear")
    lin("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)  # BFL: shift, scale; diffusers: scale, shift
    return out


def load_flux_transformer(path, dtype: torch.dtype = torch.bfloat16, fp8_storage: bool | None = False):
    """A ``FluxTransformer2DModel`` from a single FLUX.1-dev file (BFL or diffusers key layout, bf16/fp16/fp8).

    ``fp8_storage``: True keeps the block Linear weights as float8_e4m3fn (computing in ``dtype``), False
    converts everything to ``dtype``, None does what the file does."""
    from diffusers import FluxTransformer2DModel

    with open_tensors(path) as f:
        config, sources, probe = inspect_flux_transformer(f)
        model = empty_model(lambda: FluxTransformer2DModel(**config))
        if sources is None:
            prefix = f.find_prefix("single_transformer_blocks.0.attn.to_q.weight")
            sources = {n: (prefix + n, None, False) for n, _ in model.named_parameters()}
        fp8 = wants_fp8(f, probe, fp8_storage)
        blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and n.startswith(("transformer_blocks.", "single_transformer_blocks."))] if fp8 else []
        scales = fill(model, f, sources, storage_plan(model, dtype, blocks), "a FLUX.1-dev transformer", FLUX_HINT)
    use_fp8(model, blocks, dtype, scales)
    return model


# --- text encoders ------------------------------------------------------------------------------------------

@shapes_checked("the CLIP-L text encoder", CLIP_HINT)
def inspect_clip_text(path) -> tuple[dict, str]:
    """Check a CLIP-L text encoder file; returns (CLIPTextConfig values, key prefix)."""
    f = open_tensors(path)
    candidates = [k[: -len("text_model.encoder.layers.0.self_attn.q_proj.weight")] for k in f.keys
                  if k.endswith("text_model.encoder.layers.0.self_attn.q_proj.weight")]
    candidates = sorted(candidates, key=lambda p: (f.count(f"{p}text_model.encoder.layers.") >= 23, len(p)))
    if not candidates:
        raise wrong_file(f, "the CLIP-L text encoder", CLIP_HINT)
    p = candidates[0]
    layers = f.count(f"{p}text_model.encoder.layers.")
    if layers >= 23:
        raise wrong_file(f, "the CLIP-L text encoder", CLIP_HINT, "FLUX uses CLIP-L (12 layers, width 768).")
    vocab, width = f.shape(f"{p}text_model.embeddings.token_embedding.weight")
    config = shipped_config("clip_l_text.json")
    config.update(vocab_size=vocab, hidden_size=width, projection_dim=width, num_hidden_layers=layers,
                  intermediate_size=f.shape(f"{p}text_model.encoder.layers.0.mlp.fc1.weight")[0],
                  max_position_embeddings=f.shape(f"{p}text_model.embeddings.position_embedding.weight")[0],
                  # heads are not in the tensors: CLIP text towers use heads of 64 (one head when narrower)
                  num_attention_heads=max(1, width // 64))
    return config, p


def load_clip_text(path, dtype: torch.dtype = torch.bfloat16, tokenizer=None):
    """A transformers ``CLIPTextModel`` from a CLIP-L file; special token ids from ``tokenizer`` if given."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with open_tensors(path) as f:
        values, prefix = inspect_clip_text(f)
        if tokenizer is not None:
            values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        model = empty_model(lambda: CLIPTextModel(CLIPTextConfig(**values)))
        fill(model, f, hf_sources(model, prefix, "text_model."), storage_plan(model, dtype),
              "the CLIP-L text encoder", CLIP_HINT)
    return model


_T5_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"


@shapes_checked("the T5-XXL text encoder", T5_HINT)
def inspect_t5(path) -> tuple[dict, str, str]:
    """Check a T5 v1.1 encoder file; returns (T5Config values, key prefix, embedding key)."""
    f = open_tensors(path)
    p = f.find_prefix(_T5_Q)
    if p is None:
        raise wrong_file(f, "the T5-XXL text encoder", T5_HINT)
    if f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in f:
        raise wrong_file(f, "the T5-XXL text encoder", T5_HINT, "FLUX uses T5 v1.1 (gated feed-forward, wi_0/wi_1).")
    if f"{p}encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in f:
        raise wrong_file(f, "the T5-XXL text encoder", T5_HINT, "umT5 is another model's text encoder.")
    embedding = next((f"{p}{k}" for k in ("shared.weight", "encoder.embed_tokens.weight") if f"{p}{k}" in f), None)
    if embedding is None:
        raise wrong_file(f, "the T5-XXL text encoder", T5_HINT, "It has no token embedding (shared.weight).")
    vocab, width = f.shape(embedding)
    inner = f.shape(f"{p}{_T5_Q}")[0]
    buckets, heads = f.shape(f"{p}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    config = shipped_config("t5_xxl_encoder.json")
    config.update(vocab_size=vocab, d_model=width, num_heads=heads, d_kv=inner // heads,
                  d_ff=f.shape(f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
                  num_layers=f.count(f"{p}encoder.block."), relative_attention_num_buckets=buckets)
    return config, p, embedding


def load_t5_encoder(path, dtype: torch.dtype = torch.bfloat16, fp8_storage: bool | None = False):
    """A transformers ``T5EncoderModel`` from a T5-XXL file (fp16, bf16, fp8 or scaled fp8). With fp8
    storage the attention and gate Linear weights stay fp8 (``wo`` stays in ``dtype``: transformers casts the
    activations to its dtype)."""
    from transformers import T5Config, T5EncoderModel

    with open_tensors(path) as f:
        values, prefix, embedding = inspect_t5(f)
        model = empty_model(lambda: T5EncoderModel(T5Config(**values)))
        model.encoder.embed_tokens.weight = model.shared.weight  # one embedding, as from_pretrained ties it
        sources = {n: (prefix + n, None, False) for n, _ in model.named_parameters(remove_duplicate=False)}
        sources["shared.weight"] = sources["encoder.embed_tokens.weight"] = (embedding, None, False)
        fp8 = wants_fp8(f, f"{prefix}{_T5_Q}", fp8_storage)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and not n.endswith(".wo")] if fp8 else []
        scales = fill(model, f, sources, storage_plan(model, dtype, linears), "the T5-XXL text encoder", T5_HINT)
    use_fp8(model, linears, dtype, scales)
    return model


# --- VAE ----------------------------------------------------------------------------------------------------

@shapes_checked("the FLUX VAE", VAE_HINT)
def inspect_flux_vae(path) -> tuple[dict, str, str]:
    """Check a FLUX VAE file (BFL/LDM or diffusers layout); returns (AutoencoderKL config, prefix, layout)."""
    f = open_tensors(path)
    p = f.find_prefix("decoder.conv_in.weight")
    if p is None or f.find_prefix("encoder.conv_in.weight") != p:
        raise wrong_file(f, "the FLUX VAE", VAE_HINT)
    latent = f.shape(f"{p}decoder.conv_in.weight")[1]
    if latent != 16:
        raise wrong_file(f, "the FLUX VAE", VAE_HINT, "FLUX.1 latents have 16 channels.")
    diffusers = f"{p}encoder.down_blocks.0.resnets.0.conv1.weight" in f
    down, block = ("encoder.down_blocks.", "resnets.") if diffusers else ("encoder.down.", "block.")
    levels = f.count(f"{p}{down}")
    widths = [f.shape(f"{p}{down}{i}.{block}0.conv1.weight")[0] for i in range(levels)]
    config = shipped_config("flux_vae.json")
    config.pop("_class_name", None)
    config.update(
        in_channels=f.shape(f"{p}encoder.conv_in.weight")[1], out_channels=f.shape(f"{p}decoder.conv_out.weight")[0],
        latent_channels=latent, block_out_channels=widths, layers_per_block=f.count(f"{p}{down}0.{block}"),
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        # GroupNorm's group count is not in the tensors: 32 as in every SD/FLUX VAE (fewer only for narrower twins)
        norm_num_groups=math.gcd(32, *widths),
        use_quant_conv=f"{p}quant_conv.weight" in f, use_post_quant_conv=f"{p}post_quant_conv.weight" in f)
    return config, p, "diffusers" if diffusers else "ldm"


def load_flux_vae(path, dtype: torch.dtype = torch.bfloat16):
    """A diffusers ``AutoencoderKL`` from ``ae.safetensors`` (or the same VAE in diffusers layout)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with open_tensors(path) as f:
        config, prefix, layout = inspect_flux_vae(f)
        model = empty_model(lambda: AutoencoderKL(**config))
        parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        # the VAE is small (84 M parameters): read at once, converted by diffusers' own LDM → diffusers function
        state = {k[len(prefix):]: f.read(k) for k in f.keys
                 if k.startswith(prefix) and k[len(prefix):].startswith(parts)}
        if layout == "ldm":
            state = convert_ldm_vae_checkpoint(state, config)
        holder = TensorDict(f.name, state)
        sources = {n: (n, None, False) for n, _ in model.named_parameters()}
        fill(model, holder, sources, storage_plan(model, dtype), "the FLUX VAE", VAE_HINT)
    return model


# --- SigLIP -------------------------------------------------------------------------------------------------

@shapes_checked("SigLIP so400m-patch14-384", SIGLIP_HINT)
def inspect_siglip(path) -> tuple[dict, str]:
    """Check a SigLIP so400m-patch14-384 vision file (ComfyUI clip_vision layout = transformers' keys).
    SigLIP 2 at the same size has the same tensors and cannot be told apart; other sizes are refused."""
    f = open_tensors(path)
    p = f.find_prefix("vision_model.encoder.layers.0.layer_norm1.weight")
    if p is None or f"{p}vision_model.embeddings.class_embedding" in f:
        raise wrong_file(f, "SigLIP so400m-patch14-384", SIGLIP_HINT)
    patch = f.shape(f"{p}vision_model.embeddings.patch_embedding.weight")
    positions, width = f.shape(f"{p}vision_model.embeddings.position_embedding.weight")
    layers = f.count(f"{p}vision_model.encoder.layers.")
    config = shipped_config("siglip_so400m_patch14_384_vision.json")
    if len(patch) != 4 or patch[-1] != config["patch_size"] or positions != (config["image_size"] // patch[-1]) ** 2 \
            or layers != config["num_hidden_layers"]:
        raise wrong_file(f, "SigLIP so400m-patch14-384", SIGLIP_HINT,
                     "InstantCharacter reads 27 layers of 729 patch-14 tokens at 384 px.")
    for key in ("image_mean", "image_std"):
        config.pop(key)
    config.update(hidden_size=width, intermediate_size=f.shape(f"{p}vision_model.encoder.layers.0.mlp.fc1.weight")[0],
                  # heads are not in the tensors: so400m has heads of 72 (one head when narrower)
                  num_attention_heads=max(1, width // 72), vision_use_head=f"{p}vision_model.head.probe" in f)
    return config, p


def load_siglip_vision(path, dtype: torch.dtype = torch.float32):
    """A transformers ``SiglipVisionModel`` from a single SigLIP file; without the pooling head when the file
    has none (ComfyUI's copy may drop it; InstantCharacter does not use it)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with open_tensors(path) as f:
        values, prefix = inspect_siglip(f)
        model = empty_model(lambda: SiglipVisionModel(SiglipVisionConfig(**values)))
        fill(model, f, hf_sources(model, prefix, "vision_model."), storage_plan(model, dtype),
              "SigLIP so400m-patch14-384", SIGLIP_HINT)
    return model
