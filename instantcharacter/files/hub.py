"""Model downloads from the Hugging Face Hub and checks that a model folder is complete.

The token comes from ``HF_TOKEN`` or the machine's Hugging Face login (``hf auth login``), never from a
node widget, so it is never saved into a workflow. Running a download again keeps the files that already
arrived and fetches only the rest (huggingface_hub skips finished files; a dropped connection is resumed
within one run). A folder counts as present only when every file it needs is there.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DownloadError
from .checkpoint import short_error
from .hub_retries import one_line_per_retry


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    folder_name: str  # under the ComfyUI model folder
    model_folder: str  # ComfyUI folder_paths name
    patterns: tuple[str, ...]
    gated: bool = False
    size: str = ""


FLUX_DEV = HubModel(
    "black-forest-labs/FLUX.1-dev", "FLUX.1-dev", "diffusion_models",
    ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*",
     "transformer/*", "vae/*"),
    gated=True, size="33.7 GB",
)
SIGLIP = HubModel("google/siglip-so400m-patch14-384", "siglip-so400m-patch14-384", "clip_vision",
                  ("config.json", "model.safetensors", "preprocessor_config.json"), size="3.5 GB")
DINOV2 = HubModel("facebook/dinov2-giant", "dinov2-giant", "clip_vision",
                  ("config.json", "model.safetensors", "preprocessor_config.json"), size="4.5 GB")
ADAPTER = HubModel("Tencent/InstantCharacter", "", "ipadapter", ("instantcharacter_ip-adapter.bin",),
                   size="5.6 GB")
ADAPTER_FILENAME = "instantcharacter_ip-adapter.bin"

FLUX_WEIGHT_FOLDERS = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
FLUX_FIXED_FILES = (
    "model_index.json", "scheduler/scheduler_config.json",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json", "tokenizer_2/spiece.model",
)


def _missing_weights(folder: Path, sub: str, stem: str) -> list[str]:
    single = folder / sub / f"{stem}.safetensors"
    index = folder / sub / f"{stem}.safetensors.index.json"
    missing = [] if (folder / sub / "config.json").is_file() else [f"{sub}/config.json"]
    if single.is_file():
        return missing
    if not index.is_file():
        # without the index we cannot tell whether the repo has one file or shards
        return missing + [f"{sub}/{stem}.safetensors (or {index.name} and its shards)"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError):
        return missing + [f"{sub}/{index.name} (unreadable)"]
    return missing + [f"{sub}/{s}" for s in shards if not (folder / sub / s).is_file()]


def missing_flux_files(folder: str | os.PathLike) -> list[str]:
    """Files a diffusers FLUX.1-dev folder lacks (empty list: complete)."""
    folder = Path(folder)
    missing = [f for f in FLUX_FIXED_FILES if not (folder / f).is_file()]
    for sub, stem in FLUX_WEIGHT_FOLDERS.items():
        missing += _missing_weights(folder, sub, stem)
    return missing


def missing_encoder_files(folder: str | os.PathLike) -> list[str]:
    """Files a SigLIP or DINOv2 folder lacks (empty list: complete)."""
    folder = Path(folder)
    missing = [] if (folder / "preprocessor_config.json").is_file() else ["preprocessor_config.json"]
    return missing + [m.split("/", 1)[1] for m in _missing_weights(folder.parent, folder.name, "model")]


def _manual_hint(model: HubModel, dest: Path) -> str:
    files = ", ".join(model.patterns)
    return f"or put the files ({files}) from https://huggingface.co/{model.repo_id} into {dest} by hand"


def download(model: HubModel, dest: str | os.PathLike, progress: Callable[[int, int], None] | None = None,
             endpoint: str | None = None) -> Path:
    """Download ``model`` into ``dest`` (a folder; for the adapter, the ipadapter folder) and return the path
    of the folder or file. ``progress(done, total)`` counts files. ``endpoint`` overrides the Hub address
    (tests point it at a local stand-in; ``HF_ENDPOINT`` works too, if set before huggingface_hub is first
    imported, i.e. before ComfyUI starts)."""
    dest = Path(dest)
    check_destination(dest)
    created = [d for d in (dest, *dest.parents) if not d.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with one_line_per_retry():
            _snapshot(model, dest, _progress_tqdm(progress) if progress else None, endpoint)
        return _check_complete(model, dest)
    except DownloadError:
        _remove_lock_files(dest)
        for folder in created:  # a download that got nothing leaves nothing behind, not even empty parents
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def check_destination(dest: Path) -> None:
    """Refuse, before any download, a destination that cannot become a folder: a link to nothing (a moved model
    folder, an unplugged drive) or a file, there or above it."""
    for path in (dest, *dest.parents):
        if path.is_symlink() and not path.exists():
            raise DownloadError(f"{path} is a link to {os.readlink(path)}, which does not exist (moved, deleted or on "
                                "a drive that is not connected): restore its target, or delete the link to download "
                                "into a new folder there.")
        if path.exists() and not path.is_dir():
            raise DownloadError(f"{path} is a file, so nothing can be downloaded into it: move the file away and run "
                                "again.")


def _snapshot(model: HubModel, dest: Path, tqdm_class, endpoint: str | None) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        names = _files_to_fetch(model, dest, endpoint)
        # exact names, not our wildcards: whatever the server lists later, nothing else can match
        snapshot_download(model.repo_id, local_dir=dest, allow_patterns=[glob.escape(n) for n in names],
                          tqdm_class=tqdm_class, endpoint=endpoint)
    except GatedRepoError as err:
        raise DownloadError(
            f"{model.repo_id} is gated: open https://huggingface.co/{model.repo_id}, accept its licence with your "
            f"account, then make your token available (set HF_TOKEN, or run `hf auth login` on this machine) "
            f"and run again; {_manual_hint(model, dest)}."
        ) from err
    except RepositoryNotFoundError as err:
        raise DownloadError(
            f"{model.repo_id} could not be opened (HTTP {_status(err)}): "
            + ("it is gated and needs a token: accept its licence on the Hub, then set HF_TOKEN or run "
               "`hf auth login`; " if model.gated else "check the repo name and that you have access to it; ")
            + f"{_manual_hint(model, dest)}."
        ) from err
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise DownloadError(
            f"Could not download {model.repo_id} ({type(err).__name__}: {short_error(err, 239)}). Check the internet "
            f"connection and run again (files already downloaded are kept), {_manual_hint(model, dest)}."
        ) from err


def safe_relative_name(name: str) -> bool:
    """A repo file name that stays inside the folder it is downloaded into: relative, no ``..`` or empty
    segments, no drive."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith(("/", "\\")) and ":" not in parts[0] and \
        all(part not in ("", ".", "..") for part in parts)


def _files_to_fetch(model: HubModel, dest: Path, endpoint: str | None) -> list[str]:
    """The repo's files that our patterns select, each checked to stay inside ``dest``: ``*`` in a pattern
    matches ``/`` too, so a listed ``scheduler/../../x`` would otherwise be fetched (and older huggingface_hub
    versions write it where it points)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        listed = HfApi(endpoint=endpoint).list_repo_files(model.repo_id)
    except HfHubHTTPError:
        raise  # an answer (gated, not found, server error): _snapshot says what it means
    except _no_answer_errors() as err:  # refused, DNS, timeout
        raise DownloadError(
            f"Could not download {model.repo_id} ({type(err).__name__}: {short_error(err, 239)}). Check the internet "
            f"connection and run again (files already downloaded are kept), {_manual_hint(model, dest)}.") from err
    wanted = [name for name in listed if any(fnmatch.fnmatchcase(name, p) for p in model.patterns)]
    unsafe = [name for name in wanted if not safe_relative_name(name)]
    if unsafe:
        raise DownloadError(
            f"{model.repo_id} lists a file that would be written outside {dest}: {unsafe[0]!r}. Nothing was "
            f"downloaded. The server is not the real Hugging Face Hub or is compromised: check HF_ENDPOINT "
            f"(unset it to use huggingface.co), {_manual_hint(model, dest)}.")
    return wanted


def _remove_lock_files(dest: Path) -> None:
    """huggingface_hub's ``.lock`` files (and the folders left empty without them) under ``dest/.cache``: a failed
    download leaves them; the ``.metadata`` files that let the next run resume are kept."""
    cache = dest / ".cache" / "huggingface"
    if not cache.is_dir():
        return
    for lock in cache.rglob("*.lock"):
        lock.unlink(missing_ok=True)
    for folder in sorted((p for p in cache.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    for folder in (cache, cache.parent):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _no_answer_errors() -> tuple[type[BaseException], ...]:
    """The exceptions meaning "the server did not answer", for the HTTP client this huggingface_hub uses
    (requests up to 0.x, httpx in 1.x, httpx2 in 2.x)."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            imported = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return tuple(found)


def _check_complete(model: HubModel, dest: Path) -> Path:
    if model is ADAPTER:
        # snapshot_download returns a non-empty local_dir as it is when the Hub cannot be reached, and the
        # ipadapter folder usually holds other adapters: check that the file really arrived.
        if not (dest / ADAPTER_FILENAME).is_file():
            raise DownloadError(f"Could not download {ADAPTER_FILENAME} from {model.repo_id} into {dest}. Check the "
                                f"internet connection and run again, {_manual_hint(model, dest)}.")
        return dest / ADAPTER_FILENAME
    missing = missing_flux_files(dest) if model is FLUX_DEV else missing_encoder_files(dest)
    if missing:
        raise DownloadError(f"The download of {model.repo_id} into {dest} is incomplete (missing "
                            f"{', '.join(missing[:3])}); check the internet connection and run again (files already "
                            f"downloaded are kept), {_manual_hint(model, dest)}.")
    return dest


def _status(err) -> str:
    response = getattr(err, "response", None)
    return str(getattr(response, "status_code", "?"))


def _progress_tqdm(progress: Callable[[int, int], None]):
    from tqdm.auto import tqdm

    class ProgressTqdm(tqdm):
        def update(self, n=1):
            result = super().update(n)
            # snapshot_download also makes its byte bars (unit "B") from this class; report only the file count.
            if self.total and self.unit != "B":
                progress(int(self.n), int(self.total))
            return result

    return ProgressTqdm
