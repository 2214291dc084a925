"""ComfyUI's single files (flux1-dev, clip_l, t5xxl, ae, sigclip_vision) through a real ComfyUI (``COMFYUI_DIR``)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from comfyui import comfyui_dir, error_message, ui_to_api

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NODE = "InstantCharacterLoadFluxSingleFile"
SIZE = 64


@pytest.fixture(scope="module")
def single_files(host_models):
    """Tiny single files whose text encoders fit ComfyUI's own tokenizers, next to the host test models."""
    from transformers import SiglipVisionModel

    from instantcharacter.testing.single_file import write_comfyui_text_encoders, write_siglip_file

    files = write_comfyui_text_encoders(host_models)
    siglip = SiglipVisionModel.from_pretrained(host_models / "clip_vision" / "siglip-so400m-patch14-384")
    files["siglip"] = write_siglip_file(siglip, host_models / "clip_vision" / "sigclip_vision_patch14_384.safetensors")
    files["vae"] = host_models / "vae" / "ae.safetensors"  # full-width FLUX VAE (conftest), diffusers key layout
    return files


@pytest.fixture(scope="module")
def object_info(server, single_files):
    return server.get("/object_info")


def _options(info, name):
    spec = info["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def test_the_node_lists_single_files_but_not_the_files_inside_model_folders(object_info, single_files):
    info = object_info[NODE]
    assert info["description"] and info["category"] == "InstantCharacter"
    assert all(spec[1].get("tooltip") for spec in info["input"]["required"].values())
    transformers = _options(info, "transformer")
    assert single_files["transformer"].name in transformers and single_files["transformer_fp8"].name in transformers
    assert not any(o.startswith("FLUX.1-dev") for o in transformers), transformers  # the diffusers folder's shards
    assert single_files["t5_fp8"].name in _options(info, "t5") and single_files["clip"].name in _options(info, "clip_l")
    assert "ae.safetensors" in _options(info, "vae")
    siglip = _options(object_info["InstantCharacterLoadImageEncoders"], "siglip")
    assert "siglip-so400m-patch14-384" in siglip and "sigclip_vision_patch14_384.safetensors" in siglip
    assert not any("/" in o or "\\" in o for o in siglip), siglip


def _single_file_prompt(object_info, single_files, seed=0, **loader):
    """The basic workflow with Load FLUX swapped for the single-file loader and SigLIP from its single file;
    2 steps at 64×64 in fp32."""
    prompt = ui_to_api(json.loads((WORKFLOWS / "instantcharacter_basic.json").read_text()), object_info)
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "InstantCharacterLoadFlux":
            node["class_type"] = NODE
            node["inputs"] = {**dict(transformer=single_files["transformer"].name, clip_l=single_files["clip"].name,
                                     t5=single_files["t5_fp8"].name, vae="ae.safetensors", weight_dtype="fp32",
                                     fp8_storage="auto"), **loader}
        if node["class_type"] == "InstantCharacterLoadImageEncoders":
            node["inputs"]["siglip"] = "sigclip_vision_patch14_384.safetensors"
        if node["class_type"] == "InstantCharacterSampler":
            node["inputs"].update(steps=2, width=SIZE, height=SIZE, seed=seed)
        if "weight_dtype" in node["inputs"] and node["class_type"] != NODE:
            node["inputs"]["weight_dtype"] = "fp32"
    return prompt


def test_a_workflow_built_from_single_files_runs(server, object_info, single_files):
    entry = server.run(_single_file_prompt(object_info, single_files))
    assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + server.log_tail()
    files = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(files) == 1
    assert Image.open(server.output_dir / files[0]["subfolder"] / files[0]["filename"]).size == (SIZE, SIZE)


def test_a_wrong_file_gives_our_error_and_the_server_carries_on(server, object_info, single_files):
    entry = server.run(_single_file_prompt(object_info, single_files, clip_l=single_files["t5"].name))
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert single_files["t5"].name in message and "T5 (width 32) text encoder" in message and "clip_l" in message
    again = server.run(_single_file_prompt(object_info, single_files, seed=3, fp8_storage="on"))
    assert again["status"]["status_str"] == "success", error_message(again)


COMFY_KEY_MAP = """
import json, sys
sys.path.insert(0, sys.argv[1])
import comfy.utils
key_map = comfy.utils.flux_to_diffusers({"depth": 19, "depth_single_blocks": 38, "hidden_size": 3072})
out = {}
for name, source in key_map.items():
    if isinstance(source, str):
        out[name] = [source, None, False]
    else:
        rows = [source[1][1], source[1][1] + source[1][2]] if source[1] is not None else None
        out[name] = [source[0], rows, len(source) > 2]
print(json.dumps(out))
"""


def test_the_bfl_conversion_agrees_with_comfyuis_key_map():
    """At the real FLUX.1-dev size, our BFL → diffusers sources equal ComfyUI's own flux_to_diffusers map."""
    from instantcharacter.files.single_file import bfl_sources

    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", COMFY_KEY_MAP, str(comfyui_dir())], capture_output=True, text=True,
                         cwd=comfyui_dir(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    # ComfyUI up to 0.3.x names the q/k norms' parameter "scale" as BFL files do; v0.33 calls it "weight"
    # (and our loader reads files saved that way too)
    suffix = theirs["transformer_blocks.0.attn.norm_q.weight"][0].rpartition(".")[2]
    assert suffix in ("scale", "weight")
    ours = bfl_sources("", 3072, 19, 38, suffix)
    for name, (key, rows, swap) in ours.items():
        assert name in theirs, name
        assert [key, list(rows) if rows else None, swap] == theirs[name], name
