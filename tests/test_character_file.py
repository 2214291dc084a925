"""Character files: save → load gives back exactly what Encode Reference computed (and the same pictures), works
without the encoders in a fresh process, blends, and refuses every file that is not one, by name, loading nothing."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generation import run as run_generation
from instantcharacter.errors import CharacterFileError, InputError
from instantcharacter.files.character_file import FORMAT, load_character, save_character
from instantcharacter.reference.character import PREVIEW_SIDE, ReferenceFeatures
from instantcharacter.reference.encoders import ReferenceEncoders

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
RUN = dict(width=64, height=64, steps=2, seed=11, max_sequence_length=32, decode=False)


def _pictures():
    return [Image.open(ASSETS / name) for name in ("reference_girl_front.png", "reference_girl_side.png")]


@pytest.fixture(scope="module")
def features(tiny_encoders):
    return tiny_encoders.encode(_pictures(), fit="pad", weights=[1.0, 2.0], crop=True, margin=0.2)


@pytest.fixture(scope="module")
def saved(features, tmp_path_factory):
    return save_character(features, tmp_path_factory.mktemp("characters") / "girl.safetensors")


def _same(a: ReferenceFeatures, b: ReferenceFeatures) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_save_load_gives_the_encoded_features_bit_for_bit_and_says_how_they_were_made(features, saved):
    loaded = load_character(saved)
    assert _same(loaded, features)
    assert loaded.source.encoders == features.source.encoders
    assert (loaded.source.encoders.siglip, loaded.source.encoders.siglip_width) == ("siglip-so400m-patch14-384", 48)
    assert (loaded.source.encoders.dinov2, loaded.source.encoders.dinov2_width) == ("dinov2-giant", 80)
    assert loaded.source.settings == {"fit": "pad", "crop_to_character": True, "margin": 0.2, "pictures": 2,
                                      "weights": [1.0, 2.0]}
    assert loaded.source.preview.dtype == torch.uint8
    assert loaded.source.preview.shape == (2, PREVIEW_SIDE, PREVIEW_SIDE, 3)
    assert torch.equal(loaded.source.preview, features.source.preview)
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == FORMAT and metadata["format_version"] == "1"
    assert json.loads(metadata["settings"])["fit"] == "pad"


def test_half_precision_features_stay_half_precision(features, tmp_path):
    half = features.to(torch.bfloat16)
    assert _same(load_character(save_character(half, tmp_path / "half.safetensors")), half)


def test_a_loaded_character_gives_the_same_latents_as_the_encoded_one(tiny_flux, tiny_adapter, features, saved):
    encoded = run_generation(tiny_flux, tiny_adapter, features, "a girl reading", **RUN).latents
    loaded = run_generation(tiny_flux, tiny_adapter, load_character(saved), "a girl reading", **RUN).latents
    assert torch.equal(encoded, loaded)


def test_a_loaded_character_gives_apply_the_same_character_tokens(tiny_adapter, features, saved):
    from instantcharacter.run.tokens import merge_reference, project_tokens

    device, sigma = torch.device("cpu"), torch.tensor([500.0])  # sigma 0.5 on the projector's 0–1000 scale
    encoded = project_tokens(tiny_adapter, merge_reference(tiny_adapter, features, device), sigma)
    loaded = project_tokens(tiny_adapter, merge_reference(tiny_adapter, load_character(saved), device), sigma)
    assert torch.equal(encoded, loaded)


def test_two_loaded_characters_blend_like_the_encoded_ones_and_the_blend_saves(tiny_encoders, features, saved,
                                                                                tmp_path):
    other = tiny_encoders.encode([Image.open(ASSETS / "reference_girl_wave.png")], fit="stretch")
    other_file = save_character(other, tmp_path / "wave.safetensors")
    blended = ReferenceFeatures.blend([load_character(saved), load_character(other_file)], [0.7, 0.3])
    assert _same(blended, ReferenceFeatures.blend([features, other], [0.7, 0.3]))
    assert torch.equal(blended.source.preview, torch.cat([features.source.preview, other.source.preview]))
    assert [s["pictures"] for s in blended.source.settings["blend"]] == [2, 1]
    again = load_character(save_character(blended, tmp_path / "blend.safetensors"))
    assert _same(again, blended) and again.source.settings == blended.source.settings


def test_a_saved_character_generates_in_a_fresh_process_without_the_encoder_folders(tiny_models, tmp_path):
    """The command line encodes and saves with every model present, then a new process generates from the file
    with only FLUX and the adapter in its models folder: the same pictures."""
    from instantcharacter.__main__ import main

    common = ["--prompt", "a girl on a bike", "--width", "64", "--height", "48", "--steps", "2", "--dtype", "fp32",
              "--seed", "5"]
    full = tiny_models["flux"].parents[1]
    assert main(["--models-dir", str(full), "generate", *common, "--fit", "pad", "--output-dir",
                 str(tmp_path / "encoded"), "--save-character", str(tmp_path / "girl.safetensors")]) == 0
    bare = tmp_path / "models"
    (bare / "unet").mkdir(parents=True)
    (bare / "unet" / "FLUX.1-dev").symlink_to(tiny_models["flux"], target_is_directory=True)
    (bare / "ipadapter").mkdir()
    (bare / "ipadapter" / tiny_models["adapter"].name).symlink_to(tiny_models["adapter"])
    characters = bare / "instantcharacter" / "characters"
    characters.mkdir(parents=True)
    (tmp_path / "girl.safetensors").rename(characters / "girl.safetensors")
    assert not (bare / "clip_vision").exists()
    result = subprocess.run([sys.executable, "-m", "instantcharacter", "--models-dir", str(bare), "generate", *common,
                             "--character", "girl.safetensors", "--output-dir", str(tmp_path / "loaded")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    encoded, loaded = sorted((tmp_path / "encoded").glob("*.png")), sorted((tmp_path / "loaded").glob("*.png"))
    assert len(encoded) == len(loaded) == 1
    assert np.array_equal(np.asarray(Image.open(encoded[0])), np.asarray(Image.open(loaded[0])))


def _other_width_encoders(tiny_encoders) -> ReferenceEncoders:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=40, num_attention_heads=2, mlp_ratio=2,
                                    patch_size=14, image_size=518, use_swiglu_ffn=True)).eval()
    return ReferenceEncoders(tiny_encoders.siglip, dino, tiny_encoders.siglip_norm, tiny_encoders.dino_norm,
                             names=("siglip-so400m-patch14-384", "dinov2-small-64"))


def test_a_character_from_other_encoder_widths_is_refused_where_it_is_used(tiny_encoders, tiny_flux, tiny_adapter,
                                                                          features, tmp_path):
    from instantcharacter.run.native_characters import AppliedCharacter

    other = _other_width_encoders(tiny_encoders).encode([Image.open(ASSETS / "reference_girl.png")])
    loaded = load_character(save_character(other, tmp_path / "other.safetensors"))
    assert loaded.feature_dim == 48 + 64
    calls = []
    with pytest.raises(InputError, match=r"112 channels wide, made by .*'dinov2-small-64' \(width 64\).*reads 128"):
        run_generation(tiny_flux, tiny_adapter, loaded, "a girl", **RUN, on_step=lambda *a: calls.append(a))
    assert not calls
    with pytest.raises(InputError, match="112 channels wide"):
        AppliedCharacter(tiny_adapter, loaded, 0.9)
    with pytest.raises(InputError, match="made by different encoders"):
        ReferenceFeatures.blend([features, loaded])


def _flat_adapter(tiny_models, path):
    from safetensors.torch import save_file

    from instantcharacter.files.checkpoint import read_checkpoint

    raw, _ = read_checkpoint(tiny_models["adapter"])
    save_file({f"{group}.{k}": v.contiguous() for group in ("image_proj", "ip_adapter") for k, v in raw[group].items()},
              str(path))
    return path


def _resaved(saved, path, metadata=None, tensors=None):
    """The character file ``saved`` with its metadata and tensors changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), "pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    save_file({**data, **(tensors or {})}, str(path), metadata={**meta, **(metadata or {})})
    return path


def _bad_files(tmp_path, tiny_models, saved):
    from instantcharacter.testing.tiny_loras import write_tiny_lora
    from instantcharacter.testing.single_file import write_random_bfl_flux

    whole = saved.read_bytes()
    pickled = tmp_path / "girl.pt"
    torch.save({"low_res_deep": torch.zeros(1, 729, 128)}, pickled)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole[: len(whole) // 2])
    short_header = tmp_path / "cut.safetensors"
    short_header.write_bytes(whole[:40])
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    flux = write_random_bfl_flux(tmp_path / "flux1-dev.safetensors", hidden=256, double=1, single=1)
    return {
        "pickle": (pickled, "is a PyTorch pickle"),
        "pickle named .safetensors": (renamed, "is a PyTorch pickle"),
        "adapter": (_flat_adapter(tiny_models, tmp_path / "adapter.safetensors"), "looks like an IP-Adapter"),
        "adapter .bin": (tiny_models["adapter"], "is a PyTorch pickle"),
        "lora": (write_tiny_lora(tmp_path / "style.safetensors", "kohya"), "looks like a LoRA"),
        "flux": (flux, "looks like a FLUX.1-dev transformer"),
        "truncated": (truncated, "truncated or damaged"),
        "header cut": (short_header, "truncated or damaged"),
        "empty": (empty, "empty"),
        "missing": (tmp_path / "nothing.safetensors", "not found"),
        "picture": (ASSETS / "reference_girl.png", "not a character file"),
        "newer format": (_resaved(saved, tmp_path / "newer.safetensors", {"format_version": "2"}), "newer"),
        "widths changed": (_resaved(saved, tmp_path / "widths.safetensors", {"dinov2_width": "64"}),
                           r"low_res_shallow is \[1, 2187, 128\].*\[1, 2187, 112\]"),
        "tokens changed": (_resaved(saved, tmp_path / "tokens.safetensors",
                                    tensors={"low_res_deep": torch.zeros(1, 730, 128)}), r"low_res_deep is \[1, 730"),
        "extra tensor": (_resaved(saved, tmp_path / "extra.safetensors", tensors={"x": torch.zeros(1)}),
                         "holds the tensors"),
        "nan": (_resaved(saved, tmp_path / "nan.safetensors",
                         tensors={"low_res_deep": torch.full((1, 729, 128), float("nan"))}), "NaN"),
    }


BAD = ["pickle", "pickle named .safetensors", "adapter", "adapter .bin", "lora", "flux", "truncated", "header cut",
       "empty", "missing", "picture", "newer format", "widths changed", "tokens changed", "extra tensor", "nan"]


def test_every_file_that_is_not_a_character_file_is_refused_by_name(tmp_path, tiny_models, saved):
    bad = _bad_files(tmp_path, tiny_models, saved)
    assert sorted(bad) == sorted(BAD)
    for case, (path, message) in bad.items():
        with pytest.raises(CharacterFileError, match=message) as info:
            load_character(path)
        assert path.name in str(info.value), case


def test_a_pickle_is_never_opened(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for name in ("girl.safetensors", "girl.pt", "girl.ckpt"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"low_res_deep": Payload()}, f)
        with pytest.raises(CharacterFileError, match="PyTorch pickle"):
            load_character(tmp_path / name)
    assert not marker.exists()


def test_save_refuses_what_a_file_cannot_hold_and_writes_nothing(features, tmp_path):
    @dataclasses.dataclass
    class Regional(ReferenceFeatures):
        region: object = None

    regional = Regional(*features.tensors(), source=features.source, region=torch.ones(8, 8))
    with pytest.raises(InputError, match="carries region"):
        save_character(regional, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="does not say which encoders"):
        save_character(ReferenceFeatures(*features.tensors()), tmp_path / "a.safetensors")
    broken = dataclasses.replace(features, low_res_deep=features.low_res_deep.clone())
    broken.low_res_deep[0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="NaN or infinite"):
        save_character(broken, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="ending in .safetensors"):
        save_character(features, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_encode_reference_records_how_the_character_was_made(tiny_encoders):
    from schema_reader import pack_nodes

    front = torch.from_numpy(np.asarray(Image.open(ASSETS / "reference_girl_front.png").convert("RGB"),
                                        dtype=np.float32) / 255)[None]
    side = torch.from_numpy(np.asarray(Image.open(ASSETS / "reference_girl_side.png").convert("RGB"),
                                       dtype=np.float32) / 255)[None]
    with pack_nodes() as nodes:
        character, prepared = nodes.EncodeReference.execute(tiny_encoders, front, "crop", True, 0.05, "2, 1",
                                                            image_2=side)
    assert character.source.settings == {"fit": "crop", "crop_to_character": True, "margin": 0.05, "pictures": 2,
                                         "weights": [2.0, 1.0]}
    assert character.source.encoders == tiny_encoders.identity
    small = prepared.permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(small, size=(PREVIEW_SIDE, PREVIEW_SIDE), mode="area")
    got = character.source.preview.permute(0, 3, 1, 2).float() / 255
    assert got.shape == expected.shape and (got - expected).abs().mean() < 0.02  # the prepared pictures, small
