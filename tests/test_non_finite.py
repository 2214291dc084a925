"""Huge but finite inputs never give NaN (black) pictures without a word: a character file with implausible
features is refused when it loads, a region strength must be finite, and a run whose latents, character tokens or
decoded pixels turn NaN stops with a named error that says which input is implausible, writing nothing (the
command line exits non-zero). The models stay usable for the next run."""

from pathlib import Path

import pytest
import torch

from generation import SMALL_RUN as RUN, run as run_generation
from instantcharacter.__main__ import main
from instantcharacter.errors import CharacterFileError, InputError, NonFiniteResultError
from instantcharacter.files.character_file import load_character, save_character
from instantcharacter.reference.character import FEATURE_LIMIT, ReferenceFeatures, RegionalCharacter
from instantcharacter.run.decoding import decode_latents



def _scaled(features: ReferenceFeatures, factor: float) -> ReferenceFeatures:
    return ReferenceFeatures(*(t * factor for t in features.tensors()), source=features.source)


def _scaled_file(saved: Path, path: Path, factor: float) -> Path:
    """The character file ``saved`` with its features multiplied by ``factor`` (still finite in fp32)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), "pt") as f:
        tensors = {k: f.get_tensor(k) * (factor if k != "preview" else 1) for k in f.keys()}
        metadata = f.metadata()
    save_file({k: v.to(torch.uint8) if k == "preview" else v for k, v in tensors.items()}, str(path), metadata)
    return path


def test_a_character_file_with_implausible_features_is_refused_when_it_loads(girl, tmp_path):
    """Before: features ×1e30 passed every load check and gave NaN pictures in the Sampler, Apply and the CLI."""
    saved = save_character(girl, tmp_path / "girl.safetensors")
    assert girl.largest_value() < 100 < FEATURE_LIMIT  # what the encoders give
    assert torch.equal(load_character(_scaled_file(saved, tmp_path / "loud.safetensors", 100)).low_res_deep,
                       girl.low_res_deep * 100)  # larger than usual but plausible: loads
    huge = _scaled_file(saved, tmp_path / "huge.safetensors", 1e30)
    with pytest.raises(CharacterFileError, match=r"huge.safetensors holds features up to .*e\+30, far beyond what "
                                                 r"SigLIP and DINOv2 produce"):
        load_character(huge)
    with pytest.raises(InputError, match="far beyond what SigLIP and DINOv2 produce"):
        save_character(_scaled(girl, 1e30), tmp_path / "never.safetensors")  # Save Character never writes one either
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("case,says", [
    ("features", "character tokens .* are NaN or infinite.*Implausible input: the character's features"),
    ("subject_scale", r"NaN or infinite at step 1 of 2.*Implausible input: subject_scale \(1e\+30\)"),
    ("region strength", r"NaN or infinite at step 1 of 2.*Implausible input: a character region's strength"),
])
def test_a_run_that_turns_nan_stops_and_names_the_implausible_input(tiny_flux, tiny_adapter, girl, girl_latents, case,
                                                                    says):
    """Before: these runs returned NaN latents (black pictures) without an error."""
    character, settings = {
        "features": (_scaled(girl, 1e30), {}),
        "subject_scale": (girl, {"subject_scale": 1e30}),
        "region strength": (RegionalCharacter(girl, torch.ones(64, 64), 1e30), {}),
    }[case]
    steps = []
    with pytest.raises(NonFiniteResultError, match=says) as info:
        run_generation(tiny_flux, tiny_adapter, character, "a girl", **{**RUN, **settings},
                       on_step=lambda *a: steps.append(a))
    assert "nothing was written" in str(info.value) and not steps  # stopped at the first NaN, no preview of it
    assert torch.equal(run_generation(tiny_flux, tiny_adapter, girl, "a girl", **RUN).latents, girl_latents)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), float("-inf")])
def test_a_region_strength_must_be_finite(girl, strength):
    """Before: the API (and the node: ComfyUI's min/max check lets NaN through) took it and the picture was NaN."""
    with pytest.raises(InputError, match="strength must be a finite number"):
        RegionalCharacter(girl, torch.ones(8, 8), strength)


def test_decoded_pixels_that_are_not_finite_stop_the_run(tiny_flux):
    """Before: NaN pixels were clamped to NaN and returned as a picture."""
    with pytest.raises(NonFiniteResultError, match="VAE decoded NaN or infinite pixels"):
        decode_latents(tiny_flux, torch.full((1, 16, 8, 8), 1e30))
    assert torch.isfinite(decode_latents(tiny_flux, torch.zeros(1, 16, 8, 8))).all()


def test_the_command_line_exits_non_zero_and_writes_no_picture(tiny_models, girl, tmp_path, capsys):
    """Before: the CLI wrote black pictures and exited 0."""
    models = tiny_models["flux"].parents[1]
    common = ["--models-dir", str(models), "generate", "--width", "16", "--height", "16", "--steps", "1",
              "--dtype", "fp32"]
    out = tmp_path / "out"
    assert main([*common, "--subject-scale", "1e30", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite at step 1 of 1" in err and "subject_scale (1e+30)" in err, err
    assert not out.exists()
    huge = _scaled_file(save_character(girl, tmp_path / "girl.safetensors"), tmp_path / "huge.safetensors", 1e30)
    assert main([*common, "--character", str(huge), "--output-dir", str(out)]) == 2
    assert "far beyond what SigLIP and DINOv2 produce" in capsys.readouterr().err
    assert not out.exists()
