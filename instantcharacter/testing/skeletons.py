"""Full-width "skeleton" model files for running ComfyUI's own loaders in tests.

ComfyUI's UNETLoader, DualCLIPLoader and VAELoader fix the widths (FLUX 3072 with heads of 128, T5-XXL 4096 with
24 blocks, CLIP-L 768), so a graph built from them cannot use the tiny twins of :mod:`.tiny`. These files have
those widths and key layouts, but as few blocks as a loader accepts and small random weights (std 0.02, norm
scales 1, so nothing overflows in bf16 or fp8):

* ``flux1-dev-skeleton.safetensors``: Black Forest Labs layout with ``guidance_in`` (detected as FLUX.1-dev),
  1 double + 1 single block, bf16, ≈1.1 GB;
* ``t5xxl-skeleton_fp8_e4m3fn.safetensors``: T5EncoderModel keys (``shared.weight``), all 24 blocks (ComfyUI
  builds 24 whatever the file holds), fp8 e4m3fn, ≈4.8 GB;
* ``clip_l-skeleton.safetensors``: CLIPTextModel keys plus ``text_projection.weight``, 12 layers, fp16, ≈0.25 GB;
* ``instantcharacter_ip-adapter-skeleton.bin``: the published layout, 2 character-attention layers of 3072 taking
  4096-wide tokens, with the tiny projector of :func:`.tiny.tiny_adapter_config` (so it reads the tiny SigLIP
  and DINOv2 features).

Vocabularies fit ComfyUI's own tokenizers (49408 CLIP tokens, 32128 T5 rows). The safetensors files are written
tensor by tensor (peak memory: one tensor), every file under a temporary name renamed when complete. The files
are cached in :func:`skeleton_dir` and only rewritten when missing or incomplete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..files.checkpoint import FP8
from .tiny import FLUX_HEAD_DIM, randomize, tiny_adapter_config

# Bump when any writer below changes: the cache folder is named after it.
SKELETON_STAMP = "v1"
CACHE_ENV = "INSTANTCHARACTER_SKELETON_DIR"

FLUX_HIDDEN = 3072
FLUX_DOUBLE = 1
FLUX_SINGLE = 1
T5_DIM, T5_FF, T5_HEADS, T5_BLOCKS, T5_VOCAB, T5_BUCKETS = 4096, 10240, 64, 24, 32128, 32
CLIP_DIM, CLIP_FF, CLIP_LAYERS, CLIP_VOCAB, CLIP_POSITIONS = 768, 3072, 12, 49408, 77
ADAPTER_TOKEN_DIM = 4096

FILES = {
    "flux": "flux1-dev-skeleton.safetensors",
    "t5": "t5xxl-skeleton_fp8_e4m3fn.safetensors",
    "clip_l": "clip_l-skeleton.safetensors",
    "adapter": "instantcharacter_ip-adapter-skeleton.bin",
}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", FP8: "F8_E4M3"}
STD = 0.02


@dataclasses.dataclass(frozen=True)
class Spec:
    """One tensor to write: name, shape and how to fill it ("normal": std 0.02, "ones", "zeros", "eye")."""

    name: str
    shape: tuple[int, ...]
    fill: str = "normal"


def skeleton_dir() -> Path:
    """The cache folder: ``$INSTANTCHARACTER_SKELETON_DIR/<stamp>`` or
    ``~/.cache/instantcharacter-test-skeletons/<stamp>``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "instantcharacter-test-skeletons"
    return Path(root) / SKELETON_STAMP


# --- the tensors ---------------------------------------------------------------------------------------------

def _linear(name: str, rows: int, cols: int, bias: bool = True) -> list[Spec]:
    return [Spec(f"{name}.weight", (rows, cols))] + ([Spec(f"{name}.bias", (rows,))] if bias else [])


def flux_specs(hidden: int = FLUX_HIDDEN, double: int = FLUX_DOUBLE, single: int = FLUX_SINGLE) -> list[Spec]:
    """``flux1-dev.safetensors``' keys (BFL layout, with ``guidance_in``) at the given width and block counts."""
    out = _linear("img_in", hidden, 64) + _linear("txt_in", hidden, T5_DIM)
    for name, cols in (("time_in", 256), ("vector_in", CLIP_DIM), ("guidance_in", 256)):
        out += _linear(f"{name}.in_layer", hidden, cols) + _linear(f"{name}.out_layer", hidden, hidden)
    for i in range(double):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}"
            out += _linear(f"{b}_mod.lin", 6 * hidden, hidden)
            out += [Spec(f"{b}_attn.norm.{n}_norm.scale", (FLUX_HEAD_DIM,), "ones") for n in ("query", "key")]
            out += _linear(f"{b}_attn.qkv", 3 * hidden, hidden) + _linear(f"{b}_attn.proj", hidden, hidden)
            out += _linear(f"{b}_mlp.0", 4 * hidden, hidden) + _linear(f"{b}_mlp.2", hidden, 4 * hidden)
    for i in range(single):
        b = f"single_blocks.{i}"
        out += _linear(f"{b}.linear1", 7 * hidden, hidden) + _linear(f"{b}.linear2", hidden, 5 * hidden)
        out += [Spec(f"{b}.norm.{n}_norm.scale", (FLUX_HEAD_DIM,), "ones") for n in ("query", "key")]
        out += _linear(f"{b}.modulation.lin", 3 * hidden, hidden)
    out += _linear("final_layer.linear", 64, hidden) + _linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return out


def t5_specs() -> list[Spec]:
    """T5-XXL v1.1 encoder keys as in ``t5xxl_fp16.safetensors`` (the embedding once, as ``shared.weight``)."""
    inner = T5_HEADS * 64
    out = [Spec("shared.weight", (T5_VOCAB, T5_DIM))]
    for i in range(T5_BLOCKS):
        b = f"encoder.block.{i}.layer"
        out += [Spec(f"{b}.0.SelfAttention.{n}.weight", (inner, T5_DIM)) for n in ("q", "k", "v")]
        out += [Spec(f"{b}.0.SelfAttention.o.weight", (T5_DIM, inner))]
        if i == 0:
            out += [Spec(f"{b}.0.SelfAttention.relative_attention_bias.weight", (T5_BUCKETS, T5_HEADS))]
        out += [Spec(f"{b}.0.layer_norm.weight", (T5_DIM,), "ones")]
        out += [Spec(f"{b}.1.DenseReluDense.{n}.weight", (T5_FF, T5_DIM)) for n in ("wi_0", "wi_1")]
        out += [Spec(f"{b}.1.DenseReluDense.wo.weight", (T5_DIM, T5_FF)),
                Spec(f"{b}.1.layer_norm.weight", (T5_DIM,), "ones")]
    return out + [Spec("encoder.final_layer_norm.weight", (T5_DIM,), "ones")]


def clip_l_specs() -> list[Spec]:
    """CLIP-L text encoder keys as in ``clip_l.safetensors`` (``text_model.`` root, ``text_projection.weight``)."""
    out = [Spec("text_model.embeddings.token_embedding.weight", (CLIP_VOCAB, CLIP_DIM)),
           Spec("text_model.embeddings.position_embedding.weight", (CLIP_POSITIONS, CLIP_DIM))]

    def norm(name):
        return [Spec(f"{name}.weight", (CLIP_DIM,), "ones"), Spec(f"{name}.bias", (CLIP_DIM,), "zeros")]

    for i in range(CLIP_LAYERS):
        b = f"text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += _linear(f"{b}.self_attn.{n}", CLIP_DIM, CLIP_DIM)
        out += norm(f"{b}.layer_norm1") + norm(f"{b}.layer_norm2")
        out += _linear(f"{b}.mlp.fc1", CLIP_FF, CLIP_DIM) + _linear(f"{b}.mlp.fc2", CLIP_DIM, CLIP_FF)
    return out + norm("text_model.final_layer_norm") + [Spec("text_projection.weight", (CLIP_DIM, CLIP_DIM), "eye")]


# --- writing -------------------------------------------------------------------------------------------------

def _fill(spec: Spec, generator: torch.Generator) -> torch.Tensor:
    if spec.fill == "normal":
        return torch.randn(spec.shape, generator=generator).mul_(STD)
    if spec.fill == "ones":
        return torch.ones(spec.shape)
    if spec.fill == "zeros":
        return torch.zeros(spec.shape)
    if spec.fill == "eye":
        return torch.eye(*spec.shape)
    raise ValueError(spec.fill)


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(path: str | os.PathLike, specs: list[Spec], dtype: torch.dtype, seed: int) -> Path:
    """A safetensors file of ``specs`` in ``dtype``, generated and written one tensor at a time."""
    path = Path(path)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt", "instantcharacter_skeleton": SKELETON_STAMP}}
    offset = 0
    for spec in specs:
        size = math.prod(spec.shape) * itemsize
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(seed)
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for spec in specs:
            tensor = _fill(spec, generator).to(dtype).contiguous()
            f.write(tensor.view(torch.uint8).numpy().data)
            del tensor
        f.flush()
        os.fsync(f.fileno())
    return path


def complete_safetensors(path: Path) -> bool:
    """Whether ``path`` is a whole skeleton file of this stamp (its header's tensors fill the file exactly)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        stamp = header.get("__metadata__", {}).get("instantcharacter_skeleton")
        return stamp == SKELETON_STAMP and path.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, struct.error):
        return False


def write_skeleton_flux(path: str | os.PathLike, seed: int = 0) -> Path:
    return write_safetensors(path, flux_specs(), torch.bfloat16, seed + 100)


def write_skeleton_t5(path: str | os.PathLike, seed: int = 0) -> Path:
    return write_safetensors(path, t5_specs(), FP8, seed + 200)


def write_skeleton_clip_l(path: str | os.PathLike, seed: int = 0) -> Path:
    return write_safetensors(path, clip_l_specs(), torch.float16, seed + 300)


def skeleton_adapter_config():
    """The tiny projector (reads the tiny SigLIP + DINOv2 features) giving 4096-wide tokens, as the published one."""
    return dataclasses.replace(tiny_adapter_config(), token_dim=ADAPTER_TOKEN_DIM)


def write_skeleton_adapter(path: str | os.PathLike, seed: int = 0) -> Path:
    """The published adapter layout (nested ``.bin``, bf16) for the skeleton FLUX: 2 layers of 3072."""
    from ..files.adapter_file import save_adapter
    from ..model.adapter import InstantCharacterAdapter

    path = Path(path)
    adapter = InstantCharacterAdapter(skeleton_adapter_config(), FLUX_DOUBLE + FLUX_SINGLE, FLUX_HIDDEN)
    randomize(adapter, seed + 400, std=STD)
    with torch.no_grad():
        adapter.image_proj.resampler.latents.normal_(0, 1, generator=torch.Generator().manual_seed(seed + 401))
    with _atomic(path) as tmp:
        save_adapter(adapter.to(torch.bfloat16), tmp)
    return path


WRITERS: dict[str, Callable[[Path, int], Path]] = {
    "flux": write_skeleton_flux, "t5": write_skeleton_t5, "clip_l": write_skeleton_clip_l,
    "adapter": write_skeleton_adapter,
}


def _present(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return complete_safetensors(path)
    return path.is_file() and path.stat().st_size > 0  # written under a temporary name: present means whole


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer at a time per cache folder (two test runs starting together generate the files once)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the renames still keep every file whole
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_skeletons(folder: str | os.PathLike | None = None, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The skeleton files (keys flux, t5, clip_l, adapter) in ``folder`` (default :func:`skeleton_dir`), writing
    those that are missing or incomplete."""
    import time

    folder = Path(folder) if folder is not None else skeleton_dir()
    paths = {key: folder / name for key, name in FILES.items()}
    with _locked(folder):
        for leftover in folder.glob("*.tmp-*"):  # from a run that was killed mid-write (none is writing now)
            leftover.unlink(missing_ok=True)
        for key, path in paths.items():
            if _present(path):
                continue
            start = time.time()
            WRITERS[key](path, seed)
            if log:
                log(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - start:.0f} s")
    return paths
