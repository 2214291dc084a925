"""Careless and hostile input, round 3: each case that gave a raw exception, a misleading message or silence now
gets our own error, saying what to do (or the right behaviour). The bugs of this round have their own files:
test_saving_characters.py, test_non_finite.py, test_checkpoint_bounds.py."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from generation import SMALL_RUN as RUN, run as run_generation
from instantcharacter.errors import CharacterFileError, DownloadError, InputError, ModelFolderError
from instantcharacter.files.character_file import load_character, save_character



@pytest.fixture(scope="module")
def saved(girl, tmp_path_factory):
    return save_character(girl, tmp_path_factory.mktemp("characters") / "girl.safetensors")


def _safetensors(path: Path, shapes: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return path


def _odd_shapes(folder: Path) -> dict:
    """Files with the key names of a model but tensors of other ranks, for each single-file loader."""
    from instantcharacter.files import single_file

    return {
        "flux": (single_file.load_flux_transformer, _safetensors(folder / "flux.safetensors", {
            "double_blocks.0.img_attn.qkv.weight": (8, 8), "img_in.weight": (8,), "vector_in.in_layer.weight": (8,),
        })),
        "clip": (single_file.load_clip_text, _safetensors(folder / "clip.safetensors", {
            "text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
            "text_model.embeddings.token_embedding.weight": (8,),
        })),
        "t5": (single_file.load_t5_encoder, _safetensors(folder / "t5.safetensors", {
            "encoder.block.0.layer.0.SelfAttention.q.weight": (8,),
        })),
        "vae": (single_file.load_flux_vae, _safetensors(folder / "vae.safetensors", {
            "decoder.conv_in.weight": (8,), "encoder.conv_in.weight": (8,),
        })),
        "siglip": (single_file.load_siglip_vision, _safetensors(folder / "siglip.safetensors", {
            "vision_model.encoder.layers.0.layer_norm1.weight": (), "vision_model.embeddings.patch_embedding.weight":
                (8, 3, 14, 14), "vision_model.embeddings.position_embedding.weight": (729,),
        })),
    }


@pytest.mark.parametrize("kind", ["flux", "clip", "t5", "vae", "siglip"])
def test_odd_tensor_shapes_are_named_by_every_loader_and_by_load_character(tmp_path, kind):
    """Before: IndexError / ValueError from the 'what is this file' check or the loaders' shape reading."""
    load, path = _odd_shapes(tmp_path)[kind]
    with pytest.raises(ModelFolderError, match=f"{path.name} is not ") as info:
        load(path)
    assert "Pick " in str(info.value)
    with pytest.raises(CharacterFileError, match=f"{path.name} is not an InstantCharacter character file"):
        load_character(path)


def test_a_folder_given_as_a_character_file_is_called_a_folder(tmp_path):
    """Before: 'Character file not found'."""
    folder = tmp_path / "girl.safetensors"
    folder.mkdir()
    with pytest.raises(CharacterFileError, match="is a folder, not a character file"):
        load_character(folder)


def test_a_character_file_renamed_bin_is_told_to_be_renamed_back(saved, tmp_path):
    """Before: 'is a PyTorch pickle' (it is not: its content is the character file's)."""
    renamed = tmp_path / "girl.bin"
    renamed.write_bytes(saved.read_bytes())
    with pytest.raises(CharacterFileError, match=r"girl.bin is a safetensors file under a .bin name .*rename it to "
                                                 r"girl.safetensors"):
        load_character(renamed)
    os.replace(renamed, tmp_path / "girl.safetensors")
    load_character(tmp_path / "girl.safetensors")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_metadata_nested_past_the_recursion_limit_is_called_damaged(saved, tmp_path, caplog):
    """Before: RecursionError from the character file's settings and from a LoRA's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from instantcharacter.files.lora_file import clear_cache, read_lora
    from instantcharacter.testing.tiny_loras import write_tiny_lora

    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
    deep = tmp_path / "deep.safetensors"
    save_file(load_file(str(saved)), str(deep), {**metadata, "settings": _nested(100_000)})
    with pytest.raises(CharacterFileError, match="deep.safetensors lacks a readable encoder identity or settings"):
        load_character(deep)

    lora = write_tiny_lora(tmp_path / "style.safetensors", "kohya")
    save_file(load_file(str(lora)), str(lora), {"lora_adapter_metadata": _nested(100_000)})
    clear_cache()
    assert read_lora(lora).tensors  # the metadata is not needed: ignored, with a log line
    assert "ignoring unreadable LoRA metadata" in caplog.text


@pytest.mark.parametrize("shape", [(32, 32, 3), (1, 32, 32, 3), (32, 32, 4)])
def test_an_image_given_as_a_region_mask_is_called_an_image(girl, shape):
    """Before: 'A character region is one mask; this MASK holds 32'."""
    from instantcharacter.run.regions import check_region_mask

    with pytest.raises(InputError, match=r"got an IMAGE .* not a MASK: convert it with ComfyUI's Convert Image to "
                                         r"Mask"):
        check_region_mask(torch.rand(shape))
    assert check_region_mask(torch.ones(1, 32, 4)).shape == (32, 4)  # a (thin) mask is still a mask


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_generate_refuses_a_region_that_is_black_everywhere(tiny_flux, tiny_adapter, girl, fill):
    """Before: the API left the character out without a word (the node already refused it)."""
    from instantcharacter.reference.character import Characters, RegionalCharacter

    steps = []
    empty = RegionalCharacter(girl, torch.full((64, 64), fill))
    for character in (empty, Characters((RegionalCharacter(girl, torch.ones(64, 64)), empty))):
        with pytest.raises(InputError, match="black everywhere"):
            run_generation(tiny_flux, tiny_adapter, character, "a girl", **RUN,
                           on_step=lambda *a: steps.append(a))
    assert not steps


def test_a_dangling_model_folder_link_is_named_before_any_download(tmp_path, capsys):
    """Before: a raw FileExistsError from the download (models/unet/FLUX.1-dev a link to a folder that is gone)."""
    from instantcharacter.__main__ import main
    from instantcharacter.files import hub

    link = tmp_path / "models" / "unet" / "FLUX.1-dev"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(DownloadError, match=r"FLUX.1-dev is a link to .*gone, which does not exist"):
        hub.download(hub.FLUX_DEV, link, endpoint="http://127.0.0.1:9")
    assert main(["--models-dir", str(tmp_path / "models"), "generate", "--download", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "which does not exist" in err and "Traceback" not in err
    assert link.is_symlink() and not (tmp_path / "gone").exists()
    afile = tmp_path / "models" / "clip_vision"
    afile.write_text("not a folder")
    with pytest.raises(DownloadError, match="clip_vision is a file, so nothing can be downloaded into it"):
        hub.download(hub.SIGLIP, afile / "siglip-so400m-patch14-384", endpoint="http://127.0.0.1:9")


def test_cancel_is_checked_before_every_siglip_and_dinov2_layer(tiny_encoders):
    """Before: transformers 5 builds SigLIP without its vision_model wrapper, so its 27 layers shared one cancel
    point (the whole model)."""
    from instantcharacter.reference.encoders import DINO_LAYERS, SIGLIP_LAYERS

    checks = []
    tiny_encoders.encode_squares([Image.new("RGB", (384, 384), (90, 20, 20))], cancel_check=lambda: checks.append(1))
    assert len(checks) == SIGLIP_LAYERS + DINO_LAYERS  # one call of each encoder (all views in one batch)


def test_the_meta_device_is_refused_and_the_models_keep_their_weights(tiny_flux, tiny_adapter, girl):
    """Before: device='meta' moved the models there, destroying their weights until they were loaded again."""
    reference = run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN).latents
    for device in ("meta", "not-a-device"):
        with pytest.raises(InputError, match="device"):
            run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN, device=device)
    assert not any(p.is_meta for p in tiny_flux.transformer.parameters())
    assert torch.equal(run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN).latents, reference)

