"""Style LoRAs for the pipeline path: FLUX.1 LoRA files (read by :mod:`..files.lora_file`) applied to the
diffusers transformer for one run, and the FLUX value that carries them from node to node (:class:`StyledFlux`).

Nothing is merged into the base weights. Each LoRA becomes a PEFT adapter (a low-rank branch beside the layer it
changes) scaled by its strength; :meth:`StyleLoras.remove` takes the branches out again and leaves the module tree,
the state_dict and every parameter (same tensor, same values, same ``requires_grad``) as they were. The branches
are sub-modules of the blocks they change, so they travel with their blocks under every offload mode as long as
they are applied before the block streamer is built and removed after it is closed (``pipeline.generate`` does).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from torch import nn

from ..errors import InputError, InstantCharacterError, LoraFileError
from ..files.checkpoint import short_error
from ..files.lora_file import ParsedLora, read_lora

ADAPTER_PREFIX = "instantcharacter_style_"
_UNSET = object()


@dataclass(frozen=True)
class LoraSpec:
    """One style LoRA of a run: a file and its strength (1 = as trained, 0 = off, negative = the opposite)."""

    path: str
    strength: float = 1.0

    @classmethod
    def of(cls, item) -> "LoraSpec":
        """A LoraSpec from a LoraSpec or a ``(path, strength)`` pair."""
        if isinstance(item, LoraSpec):
            return item
        path, strength = item
        return cls(os.fspath(path), float(strength))


def check_fits(lora: ParsedLora, transformer: nn.Module) -> None:
    """Raise :class:`LoraFileError` unless every LoRA tensor matches a linear layer of ``transformer``."""
    problems = []
    for key, tensor in lora.tensors.items():
        module_name, sep, part = key.removeprefix("transformer.").rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight", "B.bias"):
            problems.append(f"unsupported tensor '{key}'")
            continue
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            problems.append(f"FLUX.1 has no layer '{module_name}'")
            continue
        module = getattr(module, "base_layer", module)
        if not isinstance(module, nn.Linear):
            problems.append(f"'{module_name}' is not a linear layer")
        elif part == "A.weight":
            up = lora.tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
            if tensor.ndim != 2 or tensor.shape[1] != module.in_features:
                problems.append(f"'{module_name}' takes {module.in_features} input features, the LoRA's "
                                f"down matrix has shape {tuple(tensor.shape)}")
            elif up is None or up.ndim != 2 or up.shape[1] != tensor.shape[0]:
                problems.append(f"'{module_name}' has no matching up matrix (lora_B) of rank {tensor.shape[0]}")
        elif tensor.shape[0] != module.out_features:
            problems.append(f"'{module_name}' has {module.out_features} outputs, the LoRA's up matrix "
                            f"has shape {tuple(tensor.shape)}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        if any("'x_embedder'" in p for p in problems):
            hint = ("It looks like a FLUX Control/Fill LoRA, which widens the input layer for a conditioning image; "
                    "only style LoRAs (same layer sizes as FLUX.1-dev) are supported.")
        else:
            hint = "It is probably a LoRA for another model; use one trained for FLUX.1 (dev)."
        raise LoraFileError(f"{lora.path.name} does not fit this FLUX.1 transformer: {problems[0]}{more}. {hint}")


def _require_peft() -> None:
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise InstantCharacterError(
            "Style LoRAs need the Python package 'peft' (0.17 or newer): run `python -m pip install -U peft` in "
            "ComfyUI's Python environment and restart ComfyUI."
        )


class StyleLoras:
    """The style LoRAs of one run on one transformer.

    Construction reads (cached) and checks every file and changes nothing, so a bad file fails before any model
    moves. :meth:`apply` installs the LoRAs with a strength of zero skipped; :meth:`remove` restores the
    transformer exactly, also after a partial :meth:`apply`. Usable as a context manager.
    """

    def __init__(self, transformer: nn.Module, loras: Iterable = ()):
        self.transformer = transformer
        parsed = [(read_lora(spec.path), spec.strength) for spec in map(LoraSpec.of, loras)]
        for lora, _ in parsed:
            check_fits(lora, transformer)
        self.active = [(lora, strength) for lora, strength in parsed if strength != 0]
        if self.active:
            _require_peft()
        self._saved = None

    @property
    def adapter_names(self) -> list[str]:
        return [f"{ADAPTER_PREFIX}{i}" for i in range(len(self.active))]

    def apply(self) -> None:
        if not self.active or self._saved is not None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        t = self.transformer
        loaded = list(getattr(t, "peft_config", {}))
        loaded_elsewhere = [name for name in loaded if not name.startswith(ADAPTER_PREFIX)]
        if loaded_elsewhere:
            raise InputError(f"The FLUX transformer already carries LoRA adapters loaded elsewhere "
                             f"({', '.join(loaded_elsewhere)}); reload FLUX to use style LoRAs.")
        if loaded:  # left over from a run that could not clean up
            t.unload_lora()
        self._saved = ([(p, p.requires_grad) for p in t.parameters()],
                       t.__dict__.get("_hf_peft_config_loaded", _UNSET))
        for name, (lora, _) in zip(self.adapter_names, self.active):
            try:
                with warnings.catch_warnings():  # PEFT warns about a second adapter, which is what stacking is
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    t.load_lora_adapter(dict(lora.tensors), prefix="transformer", adapter_name=name,
                                        network_alphas=lora.network_alphas, metadata=lora.metadata,
                                        low_cpu_mem_usage=True)
            except Exception as e:
                raise LoraFileError(f"{lora.path.name} could not be applied to the FLUX transformer "
                                    f"({type(e).__name__}: {short_error(e, 160)}).") from e
        t.set_adapters(self.adapter_names, [strength for _, strength in self.active])
        # The LoRA weights arrive in the file's dtype on the CPU; give them their layer's dtype and device so that
        # every offload mode computes them the same way.
        for module in t.modules():
            if isinstance(module, BaseTunerLayer):
                layer = module.get_base_layer()
                base = layer.weight
                dtype = getattr(layer, "compute_dtype", base.dtype)  # fp8-stored layers compute in compute_dtype
                for table in (module.lora_A, module.lora_B):
                    for name in self.adapter_names:
                        if name in table:
                            table[name].to(base.device, dtype)

    def remove(self) -> None:
        if self._saved is None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        t = self.transformer
        params, flag = self._saved
        if hasattr(t, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in t.modules()):
            t.unload_lora()  # puts every original layer back in place of its LoRA wrapper
        if flag is _UNSET:
            t.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            t._hf_peft_config_loaded = flag
        for p, requires_grad in params:  # PEFT freezes the base weights while adapters are in
            p.requires_grad_(requires_grad)
        self._saved = None

    def __enter__(self) -> "StyleLoras":
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class StyledFlux:
    """The FLUX value the nodes pass between them (``INSTANTCHARACTER_FLUX``): a loaded FLUX.1 pipeline and the
    style LoRAs to apply while it generates (none from the loaders). The pipeline itself is never changed, so one
    loaded FLUX serves graphs with and without LoRAs."""

    pipeline: object
    loras: tuple[LoraSpec, ...] = ()

    @classmethod
    def of(cls, flux) -> "StyledFlux":
        """``flux`` as a StyledFlux: itself, or a bare pipeline with no style LoRA."""
        return flux if isinstance(flux, cls) else cls(flux)

    def with_lora(self, path: str | os.PathLike, strength: float = 1.0) -> "StyledFlux":
        """This FLUX plus one more style LoRA; stackable, and this one is left as it was. The file is read and
        checked against the transformer here, so a bad file fails at once."""
        spec = LoraSpec(os.fspath(path), float(strength))
        check_fits(read_lora(spec.path), self.pipeline.transformer)
        return StyledFlux(self.pipeline, (*self.loras, spec))

    def __repr__(self) -> str:
        names = ", ".join(f"{Path(s.path).name} × {s.strength:g}" for s in self.loras)
        return f"StyledFlux({type(self.pipeline).__name__}, [{names}])"
