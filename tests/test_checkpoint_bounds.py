"""Pickled checkpoints a hostile file can make dangerous: a zip bomb (a small file whose records unpack to gigabytes)
is refused from the archive's directory before anything is unpacked, whatever loader reads it, and a malicious
pickle is refused by name without torch's advice to load it unsafely."""

import collections
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from instantcharacter.errors import AdapterFileError, LoraFileError, ModelFolderError

ROOT = Path(__file__).resolve().parents[1]
DECLARED = 512 * 2**20  # what the bombs below unpack to; their files are about 0.5 MB


def write_torch_zip(path: Path, tensors: dict, compress: bool = True) -> Path:
    """A PyTorch zip checkpoint in torch.save's layout whose tensors are zeros: ``tensors`` maps a key (or a
    (group, key) pair, for a nested dict) to (dtype, element count). With ``compress`` the tensor records are
    deflated, as torch.save never writes them: a zip bomb of ``sum(bytes)`` in a file of a few hundred KB."""
    class Storage:
        def __init__(self, key, dtype, numel):
            self.key, self.dtype, self.numel = key, dtype, numel

    class Tensor:
        def __init__(self, storage):
            self.storage = storage

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.storage.numel,), (1,), False,
                                                     collections.OrderedDict())

    storage_class = {torch.float32: torch.FloatStorage, torch.bfloat16: torch.BFloat16Storage,
                     torch.float16: torch.HalfStorage}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return "storage", storage_class[obj.dtype], obj.key, "cpu", obj.numel
            return None

    state, storages = {}, []
    for i, (key, (dtype, numel)) in enumerate(tensors.items()):
        storage = Storage(str(i), dtype, numel)
        storages.append(storage)
        group, name = key if isinstance(key, tuple) else (None, key)
        (state.setdefault(group, {}) if group else state)[name] = Tensor(storage)
    data = io.BytesIO()
    Pickler(data, protocol=2).dump(state)
    zeros = bytes(2**20)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/byteorder", "little")
        for storage in storages:
            info = zipfile.ZipInfo(f"archive/data/{storage.key}")
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            with archive.open(info, "w", force_zip64=True) as record:
                left = storage.numel * storage.dtype.itemsize
                while left:
                    record.write(zeros[:min(left, len(zeros))])
                    left -= min(left, len(zeros))
        archive.writestr("archive/version", "3\n")
    return path


ADAPTER_BOMB = {("image_proj", "proj_in.weight"): (torch.bfloat16, DECLARED // 2),
                ("ip_adapter", "0.to_k_ip.weight"): (torch.bfloat16, 16)}
LORA_BOMB = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (torch.float32, DECLARED // 4),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (torch.float32, 16)}

LOADERS = {
    "adapter": "from instantcharacter.files.adapter_file import load_adapter as load",
    "lora": "from instantcharacter.files.lora_file import read_lora as load",
    "single file": "from instantcharacter.files.checkpoint import TensorFile as load",
}


def _peak_growth(loader: str, path: Path) -> tuple[int, str]:
    """Load ``path`` with ``loader`` in a fresh Python: (growth of its peak resident memory in bytes, the error)."""
    script = f"""
import resource, sys
{LOADERS[loader]}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load(sys.argv[1])
    error = "loaded"
except Exception as err:
    error = f"{{type(err).__name__}}: {{err}}"
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
print(error)
"""
    out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    growth, error = out.stdout.strip().split("\n", 1)
    return int(growth), error


@pytest.mark.parametrize("loader,suffix,tensors,error", [
    ("adapter", ".bin", ADAPTER_BOMB, "AdapterFileError"),
    ("lora", ".pt", LORA_BOMB, "LoraFileError"),
    ("single file", ".ckpt", LORA_BOMB, "ModelFolderError"),
])
def test_a_zip_bomb_is_refused_before_it_is_unpacked(tmp_path, loader, suffix, tensors, error):
    """Before: the 0.5 MB adapter and LoRA files below were unpacked (peak memory grew by the 512 MiB they declare)
    and only then refused."""
    path = write_torch_zip(tmp_path / f"bomb{suffix}", tensors)
    size = path.stat().st_size
    assert size < DECLARED / 500  # a few hundred KB that unpack to 512 MiB
    growth, message = _peak_growth(loader, path)
    assert growth < DECLARED / 8, (growth, message)  # nothing near the declared size was allocated
    assert message.startswith(error) and "declares 0.54 GB of data in a file of" in message, message
    assert "zip bomb" in message


def test_a_zip_bomb_in_an_encoder_folder_is_refused_before_transformers_unpacks_it(tmp_path):
    """The folder's pickled weights get the same bound before transformers opens them (before: transformers'
    memory-mapped load failed on the compressed record, reported as a damaged folder)."""
    from instantcharacter.files.encoder_files import load_reference_encoders
    from instantcharacter.testing.tiny import write_tiny_dinov2, write_tiny_siglip

    siglip, dino = write_tiny_siglip(tmp_path / "siglip"), write_tiny_dinov2(tmp_path / "dino")
    (dino / "model.safetensors").unlink()
    write_torch_zip(dino / "pytorch_model.bin", {"embeddings.cls_token": (torch.float32, DECLARED // 4)})
    with pytest.raises(ModelFolderError, match=r"DINOv2 folder .* is not loaded: pytorch_model.bin declares 0.54 GB "
                                               r"of data in a file of"):
        load_reference_encoders(siglip, dino)


def test_an_uncompressed_checkpoint_of_the_same_layout_still_loads(tmp_path):
    """The bound reads the declared sizes only: a stored (torch.save-like) archive of real size passes it."""
    from instantcharacter.files.checkpoint import read_checkpoint

    path = write_torch_zip(tmp_path / "small.pt", {"a": (torch.float32, 1000), ("g", "b"): (torch.bfloat16, 7)},
                           compress=False)
    state, _ = read_checkpoint(path)
    assert state["a"].shape == (1000,) and state["g"]["b"].dtype == torch.bfloat16


def test_each_kind_bounds_what_its_file_can_hold(tmp_path, monkeypatch, tiny_models):
    """An uncompressed file can still hold more than its kind can: the adapter is bounded by the published size
    (fp32, with a margin), a LoRA's tensors by the largest matrix a FLUX LoRA has. Shown with the limits scaled
    down, since the real ones are gigabytes."""
    from instantcharacter.files import adapter_file, lora_file
    from instantcharacter.files.checkpoint import SizeLimit
    from instantcharacter.testing.tiny_loras import write_tiny_lora

    assert adapter_file.SIZE_LIMIT.total == 2_794_932_864 * 4 + 2**28  # published parameters in fp32 + 256 MiB
    assert lora_file.SIZE_LIMIT.per_tensor == 21504 * 3072 * 4
    adapter = tiny_models["adapter"]
    monkeypatch.setattr(adapter_file, "SIZE_LIMIT", SizeLimit("the InstantCharacter adapter", total=10_000))
    with pytest.raises(AdapterFileError, match=r"holds .* of data, more than the InstantCharacter adapter can "
                                               r"\(10,000 bytes at most\)"):
        adapter_file.load_adapter(adapter)

    lora = tmp_path / "style.pt"
    torch.save(_safetensors(write_tiny_lora(tmp_path / "style.safetensors", "kohya")), lora)
    lora_file.read_lora(lora)  # within the real bound
    monkeypatch.setattr(lora_file, "SIZE_LIMIT", SizeLimit("a FLUX.1 LoRA", per_tensor=64))
    lora_file.clear_cache()
    with pytest.raises(LoraFileError, match=r"holds a tensor of .*, larger than any in a FLUX.1 LoRA \(64 bytes"):
        lora_file.read_lora(lora)


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


class _RunsCode:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _malicious_pickles(tmp_path: Path) -> dict[str, Path]:
    """The two ways torch 2.13 words a refused global: a blocked module (os.system → 'unsupported GLOBAL posix.system
    whose module posix is blocked', in a zip checkpoint as torch.save writes them) and one not allowed by default
    (shutil.rmtree → 'Unsupported global: GLOBAL shutil.rmtree was not an allowed global'), in a legacy pickle."""
    marker = tmp_path / "ran"
    blocked = write_torch_zip(tmp_path / "blocked.bin", {("image_proj", "w"): (torch.float32, 4)}, compress=False)
    with zipfile.ZipFile(blocked) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    records["archive/data.pkl"] = pickle.dumps({"image_proj": _RunsCode(os.system, f"touch {marker}")}, protocol=2)
    with zipfile.ZipFile(blocked, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    not_allowed = tmp_path / "not_allowed.bin"
    kept = tmp_path / "kept"
    kept.mkdir()
    not_allowed.write_bytes(pickle.dumps({"image_proj": _RunsCode(shutil.rmtree, str(kept))}, protocol=2))
    return {"blocked": blocked, "not allowed": not_allowed}


@pytest.mark.parametrize("wording", ["blocked", "not allowed"])
def test_a_malicious_pickle_is_called_unsafe_in_our_words_whatever_torch_says(tmp_path, wording):
    """Before (torch 2.13): 'looks truncated or corrupt … download it again' with torch's advice to re-run with
    weights_only=False."""
    from instantcharacter.files.adapter_file import load_adapter
    from instantcharacter.files.checkpoint import TensorFile
    from instantcharacter.files.lora_file import read_lora

    path = _malicious_pickles(tmp_path)[wording]
    loaders = {load_adapter: AdapterFileError, read_lora: LoraFileError, TensorFile: ModelFolderError}
    for load, error in loaders.items():
        with pytest.raises(error, match="pickled Python objects other than tensors") as info:
            load(path)
        message = str(info.value)
        assert "weights_only" not in message and "truncated" not in message and "safe_globals" not in message, message
        assert ("GLOBAL posix.system" if wording == "blocked" else "GLOBAL shutil.rmtree") in message, message
    assert not (tmp_path / "ran").exists() and (tmp_path / "kept").is_dir()


def test_damaged_files_say_damaged_without_torchs_advice(tmp_path):
    from instantcharacter.files.adapter_file import load_adapter

    page = tmp_path / "instantcharacter_ip-adapter.bin"
    page.write_bytes(b"<!DOCTYPE html><html><body>Access denied</body></html>" * 20)
    with pytest.raises(AdapterFileError, match="truncated or corrupt") as info:
        load_adapter(page)
    assert "weights_only" not in str(info.value) and "pickled Python objects" not in str(info.value)
