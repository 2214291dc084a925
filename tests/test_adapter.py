import json
from pathlib import Path

import pytest
import torch

from instantcharacter.files.adapter_file import load_adapter, save_adapter
from instantcharacter.model.adapter import InstantCharacterAdapter
from instantcharacter.model.processors import attach
from instantcharacter.errors import AdapterFileError
from instantcharacter.testing.tiny import write_tiny_adapter

# every key name and shape of the published instantcharacter_ip-adapter.bin (our own list, 24 KB)
KEYS_FILE = Path(__file__).resolve().parent / "data" / "instantcharacter_ip-adapter.keys.json"


def test_full_size_adapter_matches_published_key_file():
    groups = json.loads(KEYS_FILE.read_text())["groups"]
    published = {f"{g}.{k}": tuple(v) for g in groups for k, v in groups[g].items()}
    with torch.device("meta"):
        adapter = InstantCharacterAdapter()
    ours = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert sorted(ours) == sorted(published)
    assert ours == published
    assert sum(v.numel() for v in adapter.state_dict().values()) == 2_794_932_864


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    bin_path = write_tiny_adapter(root / "instantcharacter_ip-adapter.bin")
    st_path = root / "instantcharacter_ip-adapter.safetensors"
    save_adapter(load_adapter(bin_path), st_path)
    return bin_path, st_path


def test_bin_is_nested_like_the_published_file(tiny_files):
    raw = torch.load(tiny_files[0], weights_only=True)
    assert set(raw) == {"image_proj", "ip_adapter"}
    assert "resampler.latents" in raw["image_proj"]
    assert "0.norm_ip_q.scale" in raw["ip_adapter"]


def test_bin_and_safetensors_load_identically(tiny_files):
    a, b = load_adapter(tiny_files[0], dtype=torch.float32), load_adapter(tiny_files[1], dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    feats = [torch.randn(1, 729 * n, a.image_proj.config.feature_dim) for n in (1, 3, 4)]
    ta = a.image_proj(feats[1], feats[0], feats[2], torch.tensor([500.0]))
    tb = b.image_proj(feats[1], feats[0], feats[2], torch.tensor([500.0]))
    assert torch.equal(ta, tb)


def test_sizes_are_read_from_the_tensors(tiny_files):
    adapter = load_adapter(tiny_files[0])
    raw = torch.load(tiny_files[0], weights_only=True)
    assert adapter.num_layers == len({k.split(".")[0] for k in raw["ip_adapter"]})
    assert adapter.image_proj.config.num_queries == raw["image_proj"]["resampler.latents"].shape[1]
    assert adapter.image_proj.config.token_dim == raw["image_proj"]["resampler.proj_out.weight"].shape[0]


def _save(path: Path, obj) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def _r(*shape):
    """A zero tensor of ``shape`` that costs one element on disk in a pickle (the checks read names and shapes
    only; the full-size InstantX adapter would otherwise be a 5.7 GB file)."""
    return torch.zeros(()).expand(*shape)


def _sd15_ip_adapter():
    ip = {}
    for i, width in zip(range(1, 32, 2), [320, 320, 640, 640, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280, 1280, 1280]):
        ip[f"{i}.to_k_ip.weight"] = _r(width, 768)
        ip[f"{i}.to_v_ip.weight"] = _r(width, 768)
    return {"image_proj": {"proj.weight": _r(3072, 1024), "proj.bias": _r(3072), "norm.weight": _r(768),
                           "norm.bias": _r(768)}, "ip_adapter": ip}


def _sdxl_ip_adapter():
    ip = {f"{i}.to_k_ip.weight": _r(640 if i < 8 else 1280, 2048) for i in range(1, 140, 2)}
    return {"image_proj": {"proj.weight": _r(8192, 1280), "norm.weight": _r(2048)}, "ip_adapter": ip}


def _instantx_flux_ip_adapter():
    proj = {"latents": _r(1, 128, 1280), "proj_in.weight": _r(1280, 1152), "proj_out.weight": _r(4096, 1280),
            "norm_out.weight": _r(4096), "layers.0.0.to_q.weight": _r(1280, 1280)}
    ip = {f"{i}.to_k_ip.weight": _r(3072, 4096) for i in range(57)}
    ip.update({f"{i}.to_v_ip.weight": _r(3072, 4096) for i in range(57)})
    return {"image_proj": proj, "ip_adapter": ip}


def _xlabs_flux_ip_adapter():
    return {"ip_adapter_proj_model.proj.weight": _r(16384, 768),
            "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight": _r(3072, 4096),
            "double_blocks.0.processor.ip_adapter_double_stream_v_proj.weight": _r(3072, 4096)}


def _lora():
    return {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": _r(4, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": _r(3072, 4)}


@pytest.mark.parametrize("name,make,expected", [
    ("ip-adapter_sd15.bin", _sd15_ip_adapter, "SD1.5 IP-Adapter"),
    ("ip-adapter_sdxl.bin", _sdxl_ip_adapter, "SDXL IP-Adapter"),
    ("ip-adapter.bin", _instantx_flux_ip_adapter, "InstantX FLUX IP-Adapter"),
    ("flux-ip-adapter.safetensors", _xlabs_flux_ip_adapter, "XLabs FLUX IP-Adapter"),
    ("style_lora.safetensors", _lora, "a LoRA"),
])
def test_foreign_checkpoints_are_named(tmp_path, name, make, expected):
    path = _save(tmp_path / name, make())
    with pytest.raises(AdapterFileError) as err:
        load_adapter(path)
    assert expected in str(err.value)
    assert "Expected an InstantCharacter adapter" in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "instantcharacter_ip-adapter.bin"
    path.write_bytes(b"")
    with pytest.raises(AdapterFileError, match="empty file"):
        load_adapter(path)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file(tmp_path, tiny_files, suffix):
    source = tiny_files[0] if suffix == ".bin" else tiny_files[1]
    data = source.read_bytes()
    path = tmp_path / f"instantcharacter_ip-adapter{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        load_adapter(path)


def test_missing_and_unexpected_keys_are_errors(tmp_path, tiny_files):
    raw = torch.load(tiny_files[0], weights_only=True)
    del raw["ip_adapter"]["1.to_v_ip.bias"]
    with pytest.raises(AdapterFileError, match="1 missing"):
        load_adapter(_save(tmp_path / "missing.bin", raw))
    raw = torch.load(tiny_files[0], weights_only=True)
    raw["image_proj"]["extra.weight"] = torch.zeros(2)
    with pytest.raises(AdapterFileError, match="1 unexpected"):
        load_adapter(_save(tmp_path / "unexpected.bin", raw))


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.bin"
    torch.save({"image_proj": {}, "ip_adapter": {}, "x": argparse.Namespace(cmd="rm -rf /")}, path)
    with pytest.raises(AdapterFileError, match="pickled Python objects"):
        load_adapter(path)


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(tmp_path / "nope.bin")


def test_adapter_for_another_transformer_is_refused(tiny_files):
    from diffusers import FluxTransformer2DModel

    adapter = load_adapter(tiny_files[0])
    transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32)
    with pytest.raises(AdapterFileError, match="attention layers"):
        attach(transformer, adapter)
