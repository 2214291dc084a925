"""The checks the command line makes before it downloads anything: which models are missing (all of them, with
their sizes), whether each can be downloaded where it goes (not into a link to nothing or a file), whether the disk
has room for them, whether a Hugging Face token is there for the gated FLUX.1-dev, and whether a CUDA GPU is there
to run them. A run that cannot work stops before the first byte."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DownloadError
from ..files.hub import check_destination
from ..files.locations import ModelLocation

GB = 10**9  # model sizes are given as the Hub shows them (decimal GB)


@dataclass
class FirstRunReport:
    lines: list[str] = field(default_factory=list)  # what was found, one line each
    problems: list[str] = field(default_factory=list)  # what stops the download, each with its fix


def gigabytes(loc: ModelLocation) -> float:
    """The download size of ``loc``'s model ("33.7 GB" → 33.7)."""
    return float(loc.model.size.split()[0])


def find_gpu() -> str | None:
    """The CUDA GPU a run would use ("NVIDIA … , 24.0 GiB"), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    return f"{torch.cuda.get_device_name(0)}, {total / 2**30:.1f} GiB"


def _no_gpu_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} sees no CUDA GPU (no NVIDIA GPU, or no driver for it)"


def _hub_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _free_bytes(folder: Path) -> int:
    existing = next(p for p in (folder.resolve(), *folder.resolve().parents) if p.exists())
    return shutil.disk_usage(existing).free


def check_before_download(missing: list[ModelLocation], models_dir: Path, gpu: str | None,
                          token: str | None = None) -> FirstRunReport:
    """What downloading ``missing`` into ``models_dir`` needs, and what is in the way. ``gpu``: :func:`find_gpu`'s
    answer; ``token``: the Hugging Face token (default: ``HF_TOKEN`` or the machine's ``hf auth login``)."""
    report = FirstRunReport()
    total = sum(gigabytes(loc) for loc in missing)
    for loc in missing:
        gated = " (gated)" if loc.model.gated else ""
        state = "" if loc.detail == "missing" else f"; {loc.detail}"
        report.lines.append(f"to download: {loc.model.repo_id}{gated}, {loc.model.size} → {loc.path}{state}")
        try:
            check_destination(loc.download_folder)
        except DownloadError as err:
            report.problems.append(str(err))

    free = _free_bytes(models_dir) / GB
    report.lines.append(f"disk: {total:.1f} GB to download, {free:.1f} GB free under {models_dir.resolve()}")
    if free < total:
        report.problems.append(f"not enough disk space: {total:.1f} GB to download, {free:.1f} GB free. Free some "
                               "space, or pass --models-dir on a larger disk.")

    gated = [loc.model for loc in missing if loc.model.gated]
    if gated:
        token = token if token is not None else _hub_token()
        if token:
            report.lines.append("Hugging Face token: found (the gated models also need their licence accepted "
                                "with that account)")
        else:
            report.lines.append("Hugging Face token: none")
            for model in gated:
                report.problems.append(
                    f"{model.repo_id} is gated and no Hugging Face token is set: open https://huggingface.co/"
                    f"{model.repo_id}, accept its licence, then set HF_TOKEN or run `hf auth login` on this machine.")

    if gpu:
        report.lines.append(f"GPU: {gpu}")
    else:
        reason = _no_gpu_reason()
        report.lines.append(f"GPU: none: {reason}")
        report.problems.append(
            f"no CUDA GPU: {reason}. FLUX.1-dev needs an NVIDIA GPU (on the CPU one picture takes hours). Install "
            f"a CUDA build of torch (see pytorch.org), or fetch the models anyway with `python install.py "
            f"--download-models --models-dir {models_dir}`.")
    return report
