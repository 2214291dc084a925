"""Tiny FLUX ``.gguf`` files in the layout of city96's FLUX.1-dev GGUF conversions, for the GGUF host test.

The layout is what ComfyUI-GGUF's ``tools/convert.py`` + its patched ``llama-quantize`` produce from
``flux1-dev.safetensors``: the Black Forest Labs key names unchanged (no prefix), ``general.architecture``
``flux``, every 1-D tensor (and every tensor of at most 1,024 elements) in F32, the input/output layers
(``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``) left in the base
precision (BF16 or F16), and the 2-D block weights quantized. Here each block gets its own quant type, so one
small file carries several of the types users download (Q8_0, Q6_K, Q5_1, Q4_0, with BF16 and F16 beside them);
a weight whose rows do not split into the type's blocks falls back to F16, as ``llama-quantize`` does.

Quantization uses the ``gguf`` package (``gguf.quants.quantize``), except Q6_K, which that package can only
dequantize: :func:`quantize_q6_k` packs it here, and :func:`read_dequantized` reads any file back with the
``gguf`` package's own reader and (numpy) dequantizers, independently of ComfyUI-GGUF's torch dequantizers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

EDGE_LAYERS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
QUANTIZATION_THRESHOLD = 1024  # ComfyUI-GGUF's convert.py: tensors this small stay F32

# block prefix -> quant type of its 2-D weights (blocks not listed: Q8_0)
FLUX_BLOCK_QTYPES = {
    "double_blocks.0.": "Q8_0",
    "double_blocks.1.": "Q6_K",
    "single_blocks.0.": "Q5_1",
    "single_blocks.1.": "Q4_0",
    "single_blocks.2.": "Q8_0",
}
# edge layer -> its base precision (real conversions keep these in the source's BF16, or F16)
FLUX_EDGE_QTYPES = {"img_in.": "BF16", "txt_in.": "BF16", "final_layer.": "BF16",
                    "time_in.": "F16", "vector_in.": "F16", "guidance_in.": "F16"}


def _gguf():
    import gguf  # the PyPI package (llama.cpp's gguf-py)

    return gguf


def flux_qtypes(state_dict: dict[str, torch.Tensor], block_qtypes: dict[str, str] | None = None,
                edge_qtypes: dict[str, str] | None = None) -> dict[str, str]:
    """The quant type (a ``GGMLQuantizationType`` name) of every tensor of a BFL FLUX state dict."""
    gguf = _gguf()
    block_qtypes = FLUX_BLOCK_QTYPES if block_qtypes is None else block_qtypes
    edge_qtypes = FLUX_EDGE_QTYPES if edge_qtypes is None else edge_qtypes
    out = {}
    for key, tensor in state_dict.items():
        if tensor.ndim <= 1 or tensor.numel() <= QUANTIZATION_THRESHOLD:
            qtype = "F32"
        elif key.startswith(EDGE_LAYERS):
            qtype = next((q for p, q in edge_qtypes.items() if key.startswith(p)), "F16")
        else:
            qtype = next((q for p, q in block_qtypes.items() if key.startswith(p)), "Q8_0")
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        if tensor.shape[-1] % block:
            qtype = "F16"  # llama-quantize's fallback for incompatible shapes
        out[key] = qtype
    return out


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    """Q6_K blocks (ggml's ``block_q6_K``: 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, fp16 d)
    of a float array whose last dimension is a multiple of 256, as uint8 rows. A plain absmax quantizer (not
    ggml's search), laid out as ggml's ``dequantize_row_q6_K`` reads it."""
    rows = data.reshape(-1, data.shape[-1]).astype(np.float32)
    x = rows.reshape(-1, 16, 16)  # blocks of 256 = 16 sub-blocks of 16
    sub = np.abs(x).max(axis=-1) / 31.0  # per sub-block scale for q in [-31, 31]
    d = (sub.reshape(-1, 16).max(axis=-1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)
    safe_d = np.where(d32 > 0, d32, 1.0)
    sc = np.clip(np.rint(sub.reshape(-1, 16) / safe_d[:, None]), -128, 127).astype(np.int8)
    step = d32[:, None] * sc.astype(np.float32)  # [blocks, 16]
    safe_step = np.where(step != 0, step, 1.0)
    q = np.where(step[..., None] != 0, np.rint(x.reshape(-1, 16, 16) / safe_step[..., None]), 0)
    levels = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [blocks, half, quarter, l]
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                             d.reshape(-1, 1).view(np.uint8)], axis=-1)
    return blocks.reshape(rows.shape[0], -1)


def quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """``data`` (float32, [rows, cols]) in GGUF's storage for ``qtype``: float arrays for F32/F16, uint8 blocks
    otherwise."""
    gguf = _gguf()
    if qtype == "F32":
        return data.astype(np.float32)
    if qtype == "F16":
        return data.astype(np.float16)
    if qtype == "Q6_K":
        return quantize_q6_k(data)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])


def write_gguf_flux(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                    qtypes: dict[str, str] | None = None) -> Path:
    """A ``flux1-dev-*.gguf`` from a BFL FLUX state dict (:func:`single_file.bfl_flux_state_dict`), each tensor
    stored as ``qtypes`` says (default :func:`flux_qtypes`)."""
    gguf = _gguf()
    qtypes = flux_qtypes(state_dict) if qtypes is None else qtypes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, tensor in state_dict.items():
        qtype = qtypes[key]
        data = quantize(tensor.detach().float().cpu().numpy(), qtype)
        writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_dequantized(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a ``.gguf`` file dequantized to float32 by the ``gguf`` package (its reader and numpy
    dequantizers), in the tensors' own shapes, and the quant type name of each."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    tensors, qtypes = {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        qtypes[t.name] = t.tensor_type.name
    return tensors, qtypes
