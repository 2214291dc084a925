"""Building a model from a checkpoint without a second copy: an empty (meta) model filled one tensor at a time,
with the Linear weights of chosen modules stored in fp8 and used in the compute dtype."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelFolderError
from .checkpoint import FP8, FP8_TYPES, TensorFile, owned
from .identify import wrong_file


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


def empty_model(factory: Callable[[], nn.Module]) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def read_source(f: TensorFile, source: Source) -> torch.Tensor:
    key, rows, swap = source
    if swap:
        half = f.shape(key)[0] // 2
        return torch.cat([f.read(key, (half, 2 * half)), f.read(key, (0, half))])
    return f.read(key, rows)


def fill(model: nn.Module, f: TensorFile, sources: dict[str, Source], dtype_of: Callable[[str], torch.dtype],
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
            raise wrong_file(f, need, hint, f"Its tensor {key} has shape {tuple(tensor.shape)}, expected {expected}.")
        param = nn.Parameter(owned(tensor.to(dtype_of(name)), tensor), requires_grad=False)
        del tensor
        for alias in names:
            owner, _, leaf = alias.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = param
    if missing:
        raise wrong_file(f, need, hint, f"It lacks {len(missing)} tensor(s) the model needs, e.g. "
                                    f"{', '.join(sources.get(m, (m,))[0] for m in missing[:3])}.")
    model.eval()
    return scales


def storage_plan(model: nn.Module, dtype: torch.dtype, fp8_modules: Iterable[str] = ()):
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


def use_fp8(model: nn.Module, modules: Iterable[str], compute_dtype: torch.dtype, scales: dict[str, float]) -> None:
    for name in modules:
        module = model.get_submodule(name)
        module.__class__ = Fp8Linear
        module.compute_dtype = compute_dtype
        module.weight_scale = scales.get(name)


def hf_sources(model: nn.Module, prefix: str, root: str) -> dict[str, Source]:
    """Parameter → file key for transformers models stored under ``root`` ("text_model." / "vision_model."), as
    ComfyUI's files and transformers 4 have it; transformers 5 names the parameters without that root."""
    return {n: (prefix + (n if n.startswith(root) else root + n), None, False) for n, _ in model.named_parameters()}


def wants_fp8(f: TensorFile, probe: str, fp8_storage: bool | None) -> bool:
    if fp8_storage is None:
        return f.dtype(probe) in FP8_TYPES
    if fp8_storage and FP8 is None:
        raise ModelFolderError("fp8 storage needs a torch with float8_e4m3fn (2.1 or newer).")
    return bool(fp8_storage)
