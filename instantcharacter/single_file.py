"""FLUX.1-dev and SigLIP from the single files ComfyUI users already have.

ComfyUI users keep FLUX.1-dev as ``flux1-dev*.safetensors`` (Black Forest Labs key layout, bf16 or fp8, bare
or under ``model.diffusion_model.``), ``clip_l.safetensors``, ``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn.safetensors``
and ``ae.safetensors``, and often the SigLIP of FLUX Redux (``sigclip_vision_patch14_384.safetensors``).
:func:`assemble_flux` builds from them the same ``FluxPipeline`` component container that
:func:`pipeline.load_flux` reads from a diffusers folder, with no network access: the configs ship in
``configs/`` and every size the tensors tell (widths, layer counts, heads) is read from the tensors, so tiny
test twins load through the same code. Tokenizer folders are arguments (ComfyUI ships both).

Tensors are read one at a time and converted on the way into an empty (meta) model, so the peak memory is
the finished model plus one tensor. With fp8 storage the Linear weights of the transformer blocks (and of
T5) stay float8_e4m3fn and are used in the compute dtype (:class:`Fp8Linear`); a bf16 copy of the model is
never made. ComfyUI's "scaled fp8" files (``scale_weight`` per layer) keep their fp8 values and scales when
stored as fp8, and are de-scaled when converted to the compute dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ModelFolderError

CONFIGS = Path(__file__).resolve().parent / "configs"
FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_TYPES = tuple(t for t in (FP8, getattr(torch, "float8_e5m2", None)) if t is not None)
_DTYPE_NAMES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": FP8, "F8_E5M2": getattr(torch, "float8_e5m2", None)}

FLUX_HINT = "Pick flux1-dev.safetensors (or an fp8 flux1-dev) from models/diffusion_models or models/unet."
CLIP_HINT = "Pick clip_l.safetensors from models/text_encoders (models/clip)."
T5_HINT = "Pick t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors from models/text_encoders (models/clip)."
VAE_HINT = "Pick ae.safetensors (the FLUX.1 VAE) from models/vae."
SIGLIP_HINT = ("Pick sigclip_vision_patch14_384.safetensors (the SigLIP of FLUX Redux) from models/clip_vision, "
               "or the google/siglip-so400m-patch14-384 folder.")


def shipped_config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text(encoding="utf-8"))


# --- reading ------------------------------------------------------------------------------------------------

class TensorFile:
    """A checkpoint opened without reading its tensors: names, shapes and dtypes come from the header
    (safetensors) or a memory map (PyTorch zip files); :meth:`read` loads one tensor or a block of its rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.is_file():
            raise ModelFolderError(f"{self.path} does not exist.")
        suffix = self.path.suffix.lower()
        if suffix == ".gguf":
            raise ModelFolderError(
                f"{self.name} is a GGUF file: load it with ComfyUI-GGUF's loader and use InstantCharacter's "
                "Apply to MODEL node (native path); this loader reads .safetensors files.")
        self._st = None
        self._sd: dict[str, torch.Tensor] | None = None
        try:
            if suffix in (".safetensors", ".sft"):
                from safetensors import safe_open

                self._st = safe_open(str(self.path), framework="pt", device="cpu")
                self.keys = list(self._st.keys())
            else:
                try:
                    sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # not a zip checkpoint: no memory map
                    sd = torch.load(self.path, map_location="cpu", weights_only=True)
                if isinstance(sd.get("state_dict"), dict):
                    sd = sd["state_dict"]
                self._sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
                self.keys = list(self._sd)
        except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
            raise ModelFolderError(
                f"{self.name} cannot be read as a safetensors or PyTorch checkpoint ({err}); it may be incomplete: "
                "download or copy it again.") from err
        self._keyset = set(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keyset

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._st = None
        self._sd = None

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        if self._st is not None:
            return _DTYPE_NAMES.get(self._st.get_slice(key).get_dtype())
        return self._sd[key].dtype

    def read(self, key: str, rows: tuple[int, int] | None = None, descale: bool = True) -> torch.Tensor:
        """The tensor (or rows ``start:stop`` of it); de-scaled when the file is ComfyUI "scaled fp8" unless
        ``descale`` is False (then see :meth:`scale`)."""
        if self._st is not None:
            tensor = self._st.get_slice(key)[rows[0]:rows[1]] if rows else self._st.get_tensor(key)
        else:
            tensor = self._sd[key][rows[0]:rows[1]] if rows else self._sd[key]
            tensor = tensor.clone()
        scale = self.scale(key) if descale else None
        return tensor if scale is None else tensor.float() * scale

    def scale(self, key: str) -> torch.Tensor | None:
        """The ``scale_weight`` of a "scaled fp8" weight (the real weight is stored × scale), if it has one."""
        scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
        return self.read(scale_key).float() if scale_key in self._keyset else None

    def find_prefix(self, marker: str) -> str | None:
        """The prefix under which ``marker`` appears (``""`` for bare keys), the shortest if several."""
        found = [k[: -len(marker)] for k in self.keys if k.endswith(marker) and (len(k) == len(marker) or
                                                                                 k[-len(marker) - 1] == ".")]
        return min(found, key=len) if found else None

    def count(self, prefix: str) -> int:
        """How many numbered children ``prefix<N>.`` there are (highest N + 1)."""
        found = {int(m.group(1)) for k in self.keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(found) + 1 if found else 0

    def precision(self) -> str:
        """The storage precision of most of the bytes, as users name it."""
        if any(k.endswith("scaled_fp8") for k in self.keys):
            return "scaled fp8"
        totals: dict[torch.dtype, int] = {}
        for k in self.keys:
            dtype = self.dtype(k)
            if dtype is not None and dtype.is_floating_point:
                totals[dtype] = totals.get(dtype, 0) + math.prod(self.shape(k)) * dtype.itemsize
        if not totals:
            return "unknown precision"
        main = max(totals, key=totals.get)
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8 e4m3fn",
                 getattr(torch, "float8_e5m2", None): "fp8 e5m2"}
        return names.get(main, str(main).removeprefix("torch."))


def _open(path) -> TensorFile:
    return path if isinstance(path, TensorFile) else TensorFile(path)


# --- what a file is -----------------------------------------------------------------------------------------

def describe(path: str | os.PathLike | TensorFile) -> str:
    """What a checkpoint looks like, from its key names and shapes: 'a FLUX.1-schnell transformer (bf16)'."""
    f = _open(path)
    return f"{_kind(f)} ({f.precision()})"


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


def _wrong(f: TensorFile, need: str, hint: str, detail: str = "") -> ModelFolderError:
    detail = f" {detail}" if detail else ""
    return ModelFolderError(f"{f.name} is not {need}: it looks like {describe(f)}.{detail} {hint}")


# --- building models from tensors ---------------------------------------------------------------------------

class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 and used in ``compute_dtype`` (the block streamer may also swap
    in a compute-dtype copy; then nothing is cast). ``weight_scale``: ComfyUI "scaled fp8" keeps the weight
    divided by a per-tensor scale; the output is multiplied back, so a cast copy needs no scale of its own."""

    compute_dtype = torch.bfloat16
    weight_scale: float | None = None

    def forward(self, x):
        weight = self.weight
        if weight.dtype != self.compute_dtype:
            weight = weight.to(self.compute_dtype)
        if self.weight_scale is None:
            return F.linear(x, weight, self.bias)
        out = F.linear(x, weight) * self.weight_scale
        return out if self.bias is None else out + self.bias


Source = tuple[str, "tuple[int, int] | None", bool]  # file key, rows, swap the two halves (BFL shift/scale)


def _empty(factory: Callable[[], nn.Module]) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def read_source(f: TensorFile, source: Source) -> torch.Tensor:
    key, rows, swap = source
    if swap:
        half = f.shape(key)[0] // 2
        return torch.cat([f.read(key, (half, 2 * half)), f.read(key, (0, half))])
    return f.read(key, rows)


def _fill(model: nn.Module, f: TensorFile, sources: dict[str, Source], dtype_of: Callable[[str], torch.dtype],
          need: str, hint: str) -> dict[str, float]:
    """Read each parameter from the file, one tensor at a time, cast it to its storage dtype and put it in
    place (tied parameters get the same tensor). A "scaled fp8" weight that stays fp8 keeps its file values;
    returns those weights' scales by module name."""
    scales: dict[str, float] = {}
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    missing = []
    for names in aliases.values():
        name = next((n for n in names if n in sources and sources[n][0] in f), None)
        if name is None:
            missing.append(names[0])
            continue
        key, rows, swap = sources[name]
        scale = f.scale(key) if dtype_of(name) == FP8 and not swap else None
        if scale is not None and scale.numel() == 1 and f.dtype(key) == FP8:
            tensor = f.read(key, rows, descale=False)
            scales[name.rpartition(".")[0]] = scale.item()
        else:
            tensor = read_source(f, sources[name])
        expected = tuple(model.get_parameter(name).shape)
        if tuple(tensor.shape) != expected:
            raise _wrong(f, need, hint, f"Its tensor {key} has shape {tuple(tensor.shape)}, expected {expected}.")
        param = nn.Parameter(tensor.to(dtype_of(name)), requires_grad=False)
        del tensor
        for alias in names:
            owner, _, leaf = alias.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = param
    if missing:
        raise _wrong(f, need, hint, f"It lacks {len(missing)} tensor(s) the model needs, e.g. "
                                    f"{', '.join(sources.get(m, (m,))[0] for m in missing[:3])}.")
    model.eval()
    return scales


def _storage_plan(model: nn.Module, dtype: torch.dtype, fp8_modules: Iterable[str] = ()):
    """dtype_of(parameter name) honouring transformers' keep-in-fp32 modules (as from_pretrained does) and
    the Linear modules whose weight is stored in fp8."""
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    fp8_weights = {f"{m}.weight" for m in fp8_modules}

    def dtype_of(name: str) -> torch.dtype:
        if name in fp8_weights:
            return FP8
        if keep and any(f".{k}." in f".{name}" for k in keep):
            return torch.float32
        return dtype
    return dtype_of


def _use_fp8(model: nn.Module, modules: Iterable[str], compute_dtype: torch.dtype, scales: dict[str, float]) -> None:
    for name in modules:
        module = model.get_submodule(name)
        module.__class__ = Fp8Linear
        module.compute_dtype = compute_dtype
        module.weight_scale = scales.get(name)


def _hf_sources(model: nn.Module, prefix: str, root: str) -> dict[str, Source]:
    """Parameter → file key for transformers models stored under ``root`` ("text_model." / "vision_model."), as
    ComfyUI's files and transformers 4 have it; transformers 5 names the parameters without that root."""
    return {n: (prefix + (n if n.startswith(root) else root + n), None, False) for n, _ in model.named_parameters()}


def _wants_fp8(f: TensorFile, probe: str, fp8_storage: bool | None) -> bool:
    if fp8_storage is None:
        return f.dtype(probe) in _FP8_TYPES
    if fp8_storage and FP8 is None:
        raise ModelFolderError("fp8 storage needs a torch with float8_e4m3fn (2.1 or newer).")
    return bool(fp8_storage)


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


def inspect_flux_transformer(path) -> tuple[dict, dict[str, Source], str]:
    """Check a FLUX.1-dev transformer file and read its config from the tensors (no weights are loaded).
    Returns (diffusers config, parameter name → source in the file, the file's probe key for its precision)."""
    f = _open(path)
    prefix = f.find_prefix("double_blocks.0.img_attn.qkv.weight")
    layout = "bfl"
    if prefix is None:
        prefix, layout = f.find_prefix("single_transformer_blocks.0.attn.to_q.weight"), "diffusers"
    probe = {k: (prefix or "") + v for k, v in _FLUX_PROBES[layout].items()}
    if prefix is None or probe["img_in"] not in f or probe["vec_in"] not in f or probe["head_norm"] not in f:
        raise _wrong(f, "a FLUX.1-dev transformer", FLUX_HINT)
    hidden, channels = f.shape(probe["img_in"])
    if channels != 64 or probe["guidance"] not in f:
        raise _wrong(f, "a FLUX.1-dev transformer", FLUX_HINT,
                     "InstantCharacter was trained on the plain FLUX.1-dev (64 input channels, guidance embedding).")
    head_dim = f.shape(probe["head_norm"])[0]
    config = shipped_config("flux1_dev_transformer.json")
    if f.shape(probe["mlp_in"])[0] != 4 * hidden or hidden % head_dim or sum(config["axes_dims_rope"]) != head_dim:
        raise _wrong(f, "a FLUX.1-dev transformer", FLUX_HINT,
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
        sources = bfl_sources(prefix, hidden, config["num_layers"], config["num_single_layers"])
    weight_probe = probe["double"] + "0.img_attn.qkv.weight" if layout == "bfl" else probe["mlp_in"]
    return config, sources, weight_probe


def bfl_sources(p: str, hidden: int, n_double: int, n_single: int) -> dict[str, Source]:
    """diffusers FluxTransformer2DModel parameter → (BFL key, rows, swap halves)."""
    out: dict[str, Source] = {}

    def lin(dst: str, src: str, rows: tuple[int, int] | None = None, swap: bool = False):
        for end in ("weight", "bias"):
            out[f"{dst}.{end}"] = (f"{p}{src}.{end}", rows, swap)

    def thirds(dst_block: str, names: tuple[str, str, str], src: str):
        for j, name in enumerate(names):
            lin(f"{dst_block}.{name}", src, (j * hidden, (j + 1) * hidden))

    def norm(dst: str, src: str):
        out[f"{dst}.weight"] = (f"{p}{src}.scale", None, False)

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

    with _open(path) as f:
        config, sources, probe = inspect_flux_transformer(f)
        model = _empty(lambda: FluxTransformer2DModel(**config))
        if sources is None:
            prefix = f.find_prefix("single_transformer_blocks.0.attn.to_q.weight")
            sources = {n: (prefix + n, None, False) for n, _ in model.named_parameters()}
        fp8 = _wants_fp8(f, probe, fp8_storage)
        blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and n.startswith(("transformer_blocks.", "single_transformer_blocks."))] if fp8 else []
        scales = _fill(model, f, sources, _storage_plan(model, dtype, blocks), "a FLUX.1-dev transformer", FLUX_HINT)
    _use_fp8(model, blocks, dtype, scales)
    return model


# --- text encoders ------------------------------------------------------------------------------------------

def inspect_clip_text(path) -> tuple[dict, str]:
    """Check a CLIP-L text encoder file; returns (CLIPTextConfig values, key prefix)."""
    f = _open(path)
    candidates = [k[: -len("text_model.encoder.layers.0.self_attn.q_proj.weight")] for k in f.keys
                  if k.endswith("text_model.encoder.layers.0.self_attn.q_proj.weight")]
    candidates = sorted(candidates, key=lambda p: (f.count(f"{p}text_model.encoder.layers.") >= 23, len(p)))
    if not candidates:
        raise _wrong(f, "the CLIP-L text encoder", CLIP_HINT)
    p = candidates[0]
    layers = f.count(f"{p}text_model.encoder.layers.")
    if layers >= 23:
        raise _wrong(f, "the CLIP-L text encoder", CLIP_HINT, "FLUX uses CLIP-L (12 layers, width 768).")
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

    with _open(path) as f:
        values, prefix = inspect_clip_text(f)
        if tokenizer is not None:
            values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        model = _empty(lambda: CLIPTextModel(CLIPTextConfig(**values)))
        _fill(model, f, _hf_sources(model, prefix, "text_model."), _storage_plan(model, dtype),
              "the CLIP-L text encoder", CLIP_HINT)
    return model


_T5_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"


def inspect_t5(path) -> tuple[dict, str, str]:
    """Check a T5 v1.1 encoder file; returns (T5Config values, key prefix, embedding key)."""
    f = _open(path)
    p = f.find_prefix(_T5_Q)
    if p is None:
        raise _wrong(f, "the T5-XXL text encoder", T5_HINT)
    if f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in f:
        raise _wrong(f, "the T5-XXL text encoder", T5_HINT, "FLUX uses T5 v1.1 (gated feed-forward, wi_0/wi_1).")
    if f"{p}encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in f:
        raise _wrong(f, "the T5-XXL text encoder", T5_HINT, "umT5 is another model's text encoder.")
    embedding = next((f"{p}{k}" for k in ("shared.weight", "encoder.embed_tokens.weight") if f"{p}{k}" in f), None)
    if embedding is None:
        raise _wrong(f, "the T5-XXL text encoder", T5_HINT, "It has no token embedding (shared.weight).")
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

    with _open(path) as f:
        values, prefix, embedding = inspect_t5(f)
        model = _empty(lambda: T5EncoderModel(T5Config(**values)))
        model.encoder.embed_tokens.weight = model.shared.weight  # one embedding, as from_pretrained ties it
        sources = {n: (prefix + n, None, False) for n, _ in model.named_parameters(remove_duplicate=False)}
        sources["shared.weight"] = sources["encoder.embed_tokens.weight"] = (embedding, None, False)
        fp8 = _wants_fp8(f, f"{prefix}{_T5_Q}", fp8_storage)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and not n.endswith(".wo")] if fp8 else []
        scales = _fill(model, f, sources, _storage_plan(model, dtype, linears), "the T5-XXL text encoder", T5_HINT)
    _use_fp8(model, linears, dtype, scales)
    return model


# --- VAE ----------------------------------------------------------------------------------------------------

def inspect_flux_vae(path) -> tuple[dict, str, str]:
    """Check a FLUX VAE file (BFL/LDM or diffusers layout); returns (AutoencoderKL config, prefix, layout)."""
    f = _open(path)
    p = f.find_prefix("decoder.conv_in.weight")
    if p is None or f.find_prefix("encoder.conv_in.weight") != p:
        raise _wrong(f, "the FLUX VAE", VAE_HINT)
    latent = f.shape(f"{p}decoder.conv_in.weight")[1]
    if latent != 16:
        raise _wrong(f, "the FLUX VAE", VAE_HINT, "FLUX.1 latents have 16 channels.")
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

    with _open(path) as f:
        config, prefix, layout = inspect_flux_vae(f)
        model = _empty(lambda: AutoencoderKL(**config))
        parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        # the VAE is small (84 M parameters): read at once, converted by diffusers' own LDM → diffusers function
        state = {k[len(prefix):]: f.read(k) for k in f.keys
                 if k.startswith(prefix) and k[len(prefix):].startswith(parts)}
        if layout == "ldm":
            state = convert_ldm_vae_checkpoint(state, config)
        holder = TensorDict(f.name, state)
        sources = {n: (n, None, False) for n, _ in model.named_parameters()}
        _fill(model, holder, sources, _storage_plan(model, dtype), "the FLUX VAE", VAE_HINT)
    return model


class TensorDict(TensorFile):
    """Converted tensors held in memory, read like a file."""

    def __init__(self, name: str, state: dict[str, torch.Tensor]):
        self.path, self.name, self._st, self._sd = Path(name), name, None, state
        self.keys = list(state)
        self._keyset = set(self.keys)


# --- the pipeline -------------------------------------------------------------------------------------------

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
    """The ``FluxPipeline`` :func:`pipeline.load_flux` gives, from ComfyUI's single files.

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


# --- SigLIP -------------------------------------------------------------------------------------------------

def inspect_siglip(path) -> tuple[dict, str]:
    """Check a SigLIP so400m-patch14-384 vision file (ComfyUI clip_vision layout = transformers' keys).
    SigLIP 2 at the same size has the same tensors and cannot be told apart; other sizes are refused."""
    f = _open(path)
    p = f.find_prefix("vision_model.encoder.layers.0.layer_norm1.weight")
    if p is None or f"{p}vision_model.embeddings.class_embedding" in f:
        raise _wrong(f, "SigLIP so400m-patch14-384", SIGLIP_HINT)
    patch = f.shape(f"{p}vision_model.embeddings.patch_embedding.weight")
    positions, width = f.shape(f"{p}vision_model.embeddings.position_embedding.weight")
    layers = f.count(f"{p}vision_model.encoder.layers.")
    config = shipped_config("siglip_so400m_patch14_384_vision.json")
    if len(patch) != 4 or patch[-1] != config["patch_size"] or positions != (config["image_size"] // patch[-1]) ** 2 \
            or layers != config["num_hidden_layers"]:
        raise _wrong(f, "SigLIP so400m-patch14-384", SIGLIP_HINT,
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

    with _open(path) as f:
        values, prefix = inspect_siglip(f)
        model = _empty(lambda: SiglipVisionModel(SiglipVisionConfig(**values)))
        _fill(model, f, _hf_sources(model, prefix, "vision_model."), _storage_plan(model, dtype),
              "SigLIP so400m-patch14-384", SIGLIP_HINT)
    return model


def load_reference_encoders(siglip, dino, dtype: torch.dtype = torch.float32):
    """``ReferenceEncoders`` with SigLIP from a Hugging Face folder or a single file, DINOv2 from its folder."""
    from transformers import Dinov2Model

    from . import encoders

    if Path(siglip).is_dir():
        return encoders.ReferenceEncoders.load(siglip, dino, dtype=dtype)
    siglip_model = load_siglip_vision(siglip, dtype)
    dino = Path(dino)
    encoders._check_folder(dino, "DINOv2", ("dinov2",), "facebook/dinov2-giant")
    dino_model = Dinov2Model.from_pretrained(dino, dtype=dtype).eval()
    if dino_model.config.num_hidden_layers != encoders.DINO_LAYERS:
        raise ModelFolderError(f"{dino.name} has {dino_model.config.num_hidden_layers} layers; InstantCharacter "
                               f"needs DINOv2-giant ({encoders.DINO_LAYERS}).")
    mean, std = encoders.SIGLIP_DEFAULT_NORM
    siglip_norm = (torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    return encoders.ReferenceEncoders(siglip_model, dino_model, siglip_norm,
                                      encoders._normalisation(dino, encoders.DINO_DEFAULT_NORM))
