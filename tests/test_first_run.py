"""The command line's first run: ``generate --download`` says what it needs before it downloads anything, stops
with every problem at once when the run could not work, and otherwise downloads all missing models and generates.

Downloads go to the local Hub stand-in (tests/hub_standin.py); test_hub's isolation (its own Hugging Face home and
token file, no token in the environment, no request to any other host) applies here too.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from hub_standin import HubStandin
from instantcharacter.__main__ import main
from instantcharacter.files import hub
from instantcharacter.files.locations import locate_all
from instantcharacter.run import first_run
from test_hub import isolated_hf, retry_waits  # noqa: F401  (autouse: the same isolation as the download tests)

TOKEN = "hf_first_run_token"
GPU = "NVIDIA Test GPU, 24.0 GiB"


@pytest.fixture
def no_download(monkeypatch):
    """Fails the test if anything is downloaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a download started")

    monkeypatch.setattr(hub, "download", refuse)


def _first_run_lines(out: str) -> list[str]:
    return out.split("before downloading:\n", 1)[1].splitlines()


def test_without_token_and_gpu_every_problem_is_named_and_nothing_is_downloaded(tmp_path, capsys, monkeypatch,
                                                                               no_download):
    monkeypatch.setattr(first_run, "find_gpu", lambda: None)
    models = tmp_path / "models"
    code = main(["--models-dir", str(models), "generate", "--download", "--steps", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    lines = _first_run_lines(out)
    assert len(lines) <= 8, out  # a few lines
    for model in (hub.FLUX_DEV, hub.SIGLIP, hub.DINOV2, hub.ADAPTER):  # all four at once, each with its size
        assert any(model.repo_id in line and model.size in line for line in lines), (model.repo_id, out)
    assert "47.3 GB to download" in out and "GB free under" in out
    assert "Hugging Face token: none" in out and "GPU: none" in out
    assert "nothing was downloaded" in err
    assert "black-forest-labs/FLUX.1-dev is gated and no Hugging Face token is set" in err
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in err and "HF_TOKEN" in err
    assert "no CUDA GPU" in err and "install.py --download-models" in err
    assert not models.exists()  # nothing written, not even the folder


def test_not_enough_disk_space_stops_before_downloading(tmp_path, capsys, monkeypatch, no_download):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(first_run, "find_gpu", lambda: GPU)
    monkeypatch.setattr(first_run, "_free_bytes", lambda folder: 10 * first_run.GB)
    assert main(["--models-dir", str(tmp_path / "models"), "generate", "--download"]) == 2
    out, err = capsys.readouterr()
    assert "Hugging Face token: found" in out and f"GPU: {GPU}" in out
    assert "not enough disk space: 47.3 GB to download, 10.0 GB free" in err
    assert "token" not in err and "GPU" not in err  # only what is in the way


def test_a_partly_present_folder_is_listed_as_incomplete_and_present_models_are_not_listed(tiny_models, tmp_path,
                                                                                          capsys, monkeypatch,
                                                                                          no_download):
    import shutil

    monkeypatch.setattr(first_run, "find_gpu", lambda: None)
    models = tmp_path / "models"
    shutil.copytree(tiny_models["flux"], models / "unet" / "FLUX.1-dev")
    shutil.copytree(tiny_models["siglip"], models / "clip_vision" / "siglip-so400m-patch14-384")
    (models / "clip_vision" / "siglip-so400m-patch14-384" / "model.safetensors").unlink()
    assert main(["--models-dir", str(models), "generate", "--download"]) == 2
    out, err = capsys.readouterr()
    lines = _first_run_lines(out)
    assert not any(hub.FLUX_DEV.repo_id in line for line in lines)  # complete: not downloaded again
    assert any(hub.SIGLIP.repo_id in line and "incomplete: missing model.safetensors" in line for line in lines)
    assert "13.6 GB to download" in out  # SigLIP (at most its whole size), DINOv2 and the adapter
    assert "Hugging Face token" not in out and "gated" not in err  # FLUX.1-dev is there: no token needed
    assert "no CUDA GPU" in err


def test_with_token_and_gpu_the_first_run_downloads_everything_and_generates(tiny_models, tmp_path, capsys,
                                                                             monkeypatch):
    """The main job from an empty models folder: the checks pass, all four models come from the (stand-in) Hub,
    FLUX.1-dev through its gate with the token, and the pictures are written."""
    from huggingface_hub import constants

    repos = {hub.FLUX_DEV.repo_id: tiny_models["flux"], hub.SIGLIP.repo_id: tiny_models["siglip"],
             hub.DINOV2.repo_id: tiny_models["dinov2"], hub.ADAPTER.repo_id: tiny_models["adapter"].parent}
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(first_run, "find_gpu", lambda: GPU)
    monkeypatch.setattr(first_run, "_free_bytes", lambda folder: 100 * first_run.GB)  # the real models are not fetched
    models, output = tmp_path / "models", tmp_path / "output"
    with HubStandin(repos, gated={hub.FLUX_DEV.repo_id}, token=TOKEN) as hubstand:
        # the command line uses huggingface_hub's default address: point it at the stand-in for this test
        monkeypatch.setattr(constants, "ENDPOINT", hubstand.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hubstand.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        code = main(["--models-dir", str(models), "generate", "--download", "--width", "64", "--height", "48",
                     "--steps", "2", "--dtype", "fp32", "--output-dir", str(output)])
        assert not hubstand.unhandled, hubstand.unhandled
        gated = hubstand.log(kind="resolve", repo=hub.FLUX_DEV.repo_id)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert gated and all(r.authorization == f"Bearer {TOKEN}" for r in gated)
    before, after = out.split("before downloading:\n", 1)[1].split("downloading ", 1)
    assert len(re.findall("to download: ", before)) == 4 and f"GPU: {GPU}" in before
    assert all(loc.present for loc in locate_all(models).values())
    written = sorted(output.glob("*.png"))
    assert len(written) == 1 and Image.open(written[0]).size == (64, 48)
    assert "step 2/2" in after
