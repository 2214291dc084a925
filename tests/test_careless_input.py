"""Input a careless (or hostile) user gives: non-finite numbers, huge sizes, odd picture modes, two runs at
once, damaged files. Each is refused with our error (or handled right),
before any model moves, and the next normal run gives the same result as before."""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from generation import SMALL_RUN as RUN, run as run_generation
from instantcharacter.errors import AdapterFileError, InputError, LoraFileError
from instantcharacter.reference.character import ReferenceFeatures, parse_weights
from instantcharacter.reference.images import MAX_SIDE, fit_square, prepare_reference, tensor_to_pil, to_rgb



@pytest.mark.parametrize("text", ["1, nan", "inf, 1", "1e999, 1", "-1, 2"])
def test_weights_text_must_be_finite_and_not_negative(text):
    with pytest.raises(InputError, match="finite numbers of 0 or more"):
        parse_weights(text, 2)


def test_blend_refuses_non_finite_weights(girl):
    with pytest.raises(InputError, match="non-negative weight"):
        ReferenceFeatures.blend([girl, girl], [1.0, float("nan")])


@pytest.mark.parametrize("setting", [dict(guidance=float("nan")), dict(subject_scale=float("inf")),
                                     dict(true_cfg=float("nan"), negative_prompt="x"), dict(width=16384, height=16384),
                                     dict(width=0), dict(steps=10_000), dict(batch_size=10_000), dict(seed=2**64),
                                     dict(seed=-1), dict(vram_budget_gb=-4.0, offload="budget"),
                                     dict(vram_budget_gb=float("nan"), offload="budget")],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_bad_settings_are_refused_before_anything_runs_and_change_nothing(tiny_flux, tiny_adapter, girl, girl_latents,
                                                                          setting):
    calls = []
    started = time.perf_counter()
    with pytest.raises(InputError) as info:
        run_generation(tiny_flux, tiny_adapter, girl, "a girl", **{**RUN, **setting},
                       on_step=lambda *a: calls.append(a))
    refused_in = time.perf_counter() - started
    assert not calls and refused_in < 1.0, refused_in  # refused up front, not after a 16384² step
    name = next(iter(setting))
    assert name.split("_")[0] in str(info.value)
    assert torch.equal(run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN).latents, girl_latents)


def test_non_finite_latent_and_features_are_refused(tiny_flux, tiny_adapter, girl, girl_latents):
    latent = torch.zeros(1, 16, 8, 8)
    latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="LATENT holds NaN"):
        run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN, init_latents=latent, denoise=0.5)
    broken = ReferenceFeatures(*(t.clone() for t in girl.tensors()))
    broken.low_res_deep[0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="features hold NaN"):
        run_generation(tiny_flux, tiny_adapter, broken, "a girl", **RUN)
    assert torch.equal(run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN).latents, girl_latents)


def test_a_nan_image_is_refused():
    image = torch.rand(32, 32, 3)
    image[3, 3, 1] = float("nan")
    with pytest.raises(InputError, match="IMAGE holds NaN"):
        tensor_to_pil(image)


@pytest.mark.parametrize("mode,values,expected", [
    ("I;16", np.full((8, 8), 32768, dtype=np.uint16), 128),  # a 16-bit PNG at half grey
    ("I", np.full((8, 8), 65535, dtype=np.int32), 255),
    ("I", np.full((8, 8), 200, dtype=np.int32), 200),  # an 8-bit range stays as it is
    ("F", np.full((8, 8), 0.5, dtype=np.float32), 128),  # float in 0–1
    ("F", np.full((8, 8), 100.0, dtype=np.float32), 100),
])
def test_16_bit_and_float_pictures_keep_their_grey(mode, values, expected):
    image = Image.fromarray(values, mode=mode) if mode != "I;16" else Image.fromarray(values).convert("I;16")
    if mode == "I;16":
        image = Image.frombytes("I;16", (8, 8), values.tobytes())
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb.mean()) - expected) <= 1, (mode, rgb.mean())


def test_a_16_bit_png_reference_is_not_white(tmp_path):
    path = tmp_path / "grey16.png"
    values = np.full((64, 64), 20000, dtype=np.uint16)
    values[16:48, 16:48] = 5000
    Image.frombytes("I;16", (64, 64), values.tobytes()).save(path)
    square = prepare_reference(Image.open(path), "pad")
    grey = np.asarray(square)
    assert 60 <= grey.mean() <= 80 and grey.min() < 25  # 20000/65535·255 ≈ 78, the centre ≈ 19


def test_extreme_aspect_ratio_builds_no_giant_canvas():
    image = Image.new("RGB", (30000, 16), (10, 20, 30))
    started = time.perf_counter()
    for fit in ("pad", "stretch", "crop"):
        square = fit_square(image, fit)
        assert square.width == square.height <= MAX_SIDE
    assert time.perf_counter() - started < 5
    assert fit_square(image, "pad").getpixel((0, 0)) == (255, 255, 255)  # padded with white, not black


def test_two_runs_at_once_on_one_pipeline_are_serialised(tiny_flux, tiny_adapter, girl, girl_latents):
    plain = run_generation(tiny_flux, None, None, "a girl", **RUN).latents
    results, errors = {}, []

    def worker(name, with_character):
        try:
            out = run_generation(tiny_flux, tiny_adapter if with_character else None,
                                 girl if with_character else None, "a girl", **RUN)
            results[name] = out.latents
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f"t{i}", i % 2 == 0)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(torch.equal(results[f"t{i}"], girl_latents if i % 2 == 0 else plain) for i in range(4))
    assert torch.equal(run_generation(tiny_flux, None, None, "a girl", **RUN).latents, plain)


def test_a_lora_with_nan_is_refused(tmp_path, tiny_flux):
    from safetensors.torch import load_file, save_file

    from instantcharacter.run.style_loras import StyledFlux
    from instantcharacter.testing.tiny_loras import write_tiny_lora

    path = write_tiny_lora(tmp_path / "style.safetensors", "kohya")
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(LoraFileError, match="NaN or infinite"):
        StyledFlux(tiny_flux).with_lora(path, 1.0)


def test_a_damaged_bin_is_called_damaged_and_other_safetensors_spellings_load(tmp_path, tiny_models):
    from instantcharacter.files.adapter_file import load_adapter
    from instantcharacter.testing.tiny import write_tiny_adapter

    html = tmp_path / "instantcharacter_ip-adapter.bin"
    html.write_bytes(b"<!DOCTYPE html><html><body>Access denied</body></html>" * 20)
    with pytest.raises(AdapterFileError, match="truncated or corrupt") as info:
        load_adapter(html)
    assert "pickled Python objects" not in str(info.value)
    reference = load_adapter(tiny_models["adapter"])
    for name in ("adapter.sft", "adapter.SAFETENSORS"):
        path = write_tiny_adapter(tmp_path / "source.safetensors")
        path = path.rename(tmp_path / name)
        loaded = load_adapter(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("case", ["missing", "folder", "not_a_picture", "output_is_a_file", "steps"])
def test_cli_checks_what_the_user_typed_before_looking_for_models(tmp_path, case, capsys, monkeypatch):
    """Bad CLI input is named at once (exit 2, no traceback), before models are looked for or downloaded:
    here the models folder is empty and --download would try the Hub. (The command line's main() in this
    process; tests/test_readme.py runs ``python -m instantcharacter`` itself.)"""
    from instantcharacter.__main__ import main
    from instantcharacter.files import hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download started")

    monkeypatch.setattr(hub, "download", no_download)
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "notes.txt"
    bad.write_text("not a picture")
    output = tmp_path / "taken"
    output.write_text("a file")
    args = {"missing": ["--reference", str(tmp_path / "nope.png")], "folder": ["--reference", str(tmp_path)],
            "not_a_picture": ["--reference", str(bad)], "output_is_a_file": ["--output-dir", str(output)],
            "steps": ["--steps", "0"]}[case]
    code = main(["generate", "--download", "--models-dir", str(tmp_path / "models"), *args])
    out, err = capsys.readouterr()
    assert code == 2, err[-2000:]
    expected = {"missing": "not found", "folder": "a folder", "not_a_picture": "not a picture",
                "output_is_a_file": "is a file", "steps": "steps must be"}[case]
    assert expected in err and "download" not in out, err
    assert not (tmp_path / "models").exists()


def test_encoder_folders_damaged_or_incomplete_get_our_error_and_no_load_report(tmp_path, capfd):
    import json
    import shutil

    from instantcharacter.errors import ModelFolderError
    from instantcharacter.files.encoder_files import load_reference_encoders
    from instantcharacter.testing.tiny import write_tiny_dinov2, write_tiny_siglip

    siglip, dino = write_tiny_siglip(tmp_path / "siglip"), write_tiny_dinov2(tmp_path / "dino")
    capfd.readouterr()
    load_reference_encoders(siglip, dino)
    assert "LOAD REPORT" not in capfd.readouterr().err  # SigLIP's unused text tower is not reported key by key

    broken = tmp_path / "broken"
    shutil.copytree(siglip, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated download
    with pytest.raises(ModelFolderError, match="broken could not be loaded .*download it again"):
        load_reference_encoders(broken, dino)
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(ModelFolderError, match="broken"):
        load_reference_encoders(broken, dino)

    deeper = tmp_path / "deeper"
    shutil.copytree(dino, deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 41}))  # more than its weights
    with pytest.raises(ModelFolderError, match="lacks .* weight"):
        load_reference_encoders(siglip, deeper)


def test_a_flux_folder_whose_config_wants_more_blocks_than_its_weights_is_refused(tmp_path):
    import json
    import shutil

    from instantcharacter.errors import ModelFolderError
    from instantcharacter.files.flux import load_flux
    from instantcharacter.testing.tiny import write_tiny_flux

    folder = write_tiny_flux(tmp_path / "FLUX.1-dev")
    config = folder / "transformer" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "num_layers": data["num_layers"] + 1}))
    with pytest.raises(ModelFolderError, match="lacks .* weight"):
        load_flux(folder, dtype=torch.float32)
    config.write_text(json.dumps(data))
    index = next((folder / "transformer").glob("*.index.json"))
    shard = sorted((folder / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard
    with pytest.raises(ModelFolderError, match="could not be loaded"):
        load_flux(folder, dtype=torch.float32)
    assert index.is_file()
    shutil.rmtree(folder)


def test_an_empty_mask_or_an_all_transparent_picture_is_refused():
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    with pytest.raises(InputError, match="mask is empty"):
        prepare_reference(picture, "pad", torch.zeros(32, 32))
    with pytest.raises(InputError, match="entirely white"):
        prepare_reference(Image.new("RGBA", (32, 32), (200, 30, 30, 0)), "pad")
    assert np.asarray(prepare_reference(picture, "pad", torch.ones(32, 32))).min() < 255


class _Cancelled(Exception):
    pass


def test_cancel_is_checked_between_every_phase(tiny_flux, tiny_adapter, girl, girl_latents):
    """Cancel pressed while the prompts are encoded, the character tokens made or the pictures decoded stops
    the run there, not after the first step; the models are left as they were."""
    kwargs = {**RUN, "decode": True, "batch_size": 2}
    record, steps = [], []
    run_generation(tiny_flux, tiny_adapter, girl, "a girl", **kwargs, offload="sequential",
                   on_step=lambda *a: steps.append(a), cancel_check=lambda: record.append(len(steps)))
    assert record[0] == 0 and record.count(0) >= 4  # before, inside and after the prompts, after the tokens
    assert record.count(RUN["steps"]) >= 4  # each of the 2 pictures, before its VAE decoder
    for at in sorted({0, record.count(0) - 1, record.index(RUN["steps"]), len(record) - 1}):
        calls, steps = [], []

        def cancel():
            calls.append(1)
            if len(calls) == at + 1:
                raise _Cancelled

        with pytest.raises(_Cancelled):
            run_generation(tiny_flux, tiny_adapter, girl, "a girl", **kwargs, offload="sequential",
                           on_step=lambda *a: steps.append(a), cancel_check=cancel)
        assert len(steps) == record[at]
    assert torch.equal(run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN).latents, girl_latents)


def test_cancel_reaches_inside_t5_the_vae_decode_and_the_encoders(tiny_flux, tiny_adapter, tiny_encoders, girl,
                                                                  girl_latents):
    t5_blocks = len(tiny_flux.text_encoder_2.encoder.block)
    calls = []

    def cancel_at(n):
        def check():
            calls.append(1)
            if len(calls) == n:
                raise _Cancelled
        return check

    # 1 check before the prompts, then one per T5 block: cancelled inside the encoding, before any step
    steps = []
    with pytest.raises(_Cancelled):
        run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN, on_step=lambda *a: steps.append(a),
                       cancel_check=cancel_at(1 + t5_blocks))
    assert not steps
    # the decode: after the last step, the check before the image and then the one before the VAE decoder
    seen, after = [], []

    def in_decode():
        if len(seen) == RUN["steps"]:
            after.append(1)
            if len(after) == 2:
                raise _Cancelled

    with pytest.raises(_Cancelled):
        run_generation(tiny_flux, tiny_adapter, girl, "a girl", **{**RUN, "decode": True}, offload="sequential",
                       on_step=lambda *a: seen.append(a), cancel_check=in_decode)
    assert len(seen) == RUN["steps"] and len(after) == 2
    calls.clear()
    with pytest.raises(_Cancelled):  # the encoders: before one of their layers
        tiny_encoders.encode_squares([Image.new("RGB", (384, 384), (90, 20, 20))], cancel_check=cancel_at(3))
    assert not any(m._forward_pre_hooks for m in tiny_encoders.siglip.modules())
    assert not any(m._forward_pre_hooks for m in tiny_flux.vae.modules())
    assert torch.equal(run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN).latents, girl_latents)


def test_a_malicious_pickle_in_an_encoder_folder_is_refused_without_library_advice(tmp_path):
    import os
    import pickle

    from instantcharacter.errors import ModelFolderError
    from instantcharacter.files.encoder_files import load_reference_encoders
    from instantcharacter.testing.tiny import write_tiny_dinov2, write_tiny_siglip

    siglip, dino = write_tiny_siglip(tmp_path / "siglip"), write_tiny_dinov2(tmp_path / "dino")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (siglip / "model.safetensors").unlink()
    with open(siglip / "pytorch_model.bin", "wb") as f:
        pickle.dump({"vision_model.embeddings.patch_embedding.weight": Payload()}, f)
    with pytest.raises(ModelFolderError, match="not loaded .*could run code") as info:
        load_reference_encoders(siglip, dino)
    assert "weights_only=False" not in str(info.value) and not marker.exists()
