"""The pack inside a real ComfyUI (``COMFYUI_DIR``): node registry, shipped workflows, errors."""

import copy
import json
import os
import re
import subprocess
import sys
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui import PACK, combo_options, comfyui_dir, error_message, ui_to_api, widget_inputs

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SIZE = 64
# the shipped workflows this server runs, with the pictures each saves (count, size); the native ones need ComfyUI's
# full-width model files and are only checked against the schemas here
PIPELINE_WORKFLOWS = {
    "instantcharacter_basic.json": (1, (SIZE, SIZE)),
    "instantcharacter_multiview_mask.json": (4, (SIZE, SIZE)),
    "instantcharacter_img2img.json": (1, (128, 128)),
    "instantcharacter_style_lora_best_of_4.json": (1, (SIZE, SIZE)),  # the best one is saved, 4 previewed
    "instantcharacter_two_characters.json": (1, (SIZE, SIZE)),
    "instantcharacter_load_character.json": (1, (SIZE, SIZE)),
}
# workflows that need another's output first: the load workflow reads the file the save workflow writes
RUN_FIRST = {"instantcharacter_load_character.json": "instantcharacter_save_character.json"}
OUR_NODES = ["InstantCharacterLoadFlux", "InstantCharacterLoadImageEncoders", "InstantCharacterLoadAdapter",
             "InstantCharacterEncodeReference", "InstantCharacterBlendCharacters", "InstantCharacterStyleLora",
             "InstantCharacterSampler", "InstantCharacterConsistencyScore", "InstantCharacterCharacterRegion",
             "InstantCharacterCombineCharacters", "InstantCharacterSaveCharacter", "InstantCharacterLoadCharacter",
             "InstantCharacterStoryboard", "InstantCharacterStoryboardPanels", "InstantCharacterContactSheet"]
# combos listing files on disk: what a user has differs from this test's tiny models
FILE_CHOICES = {"image", "model", "siglip", "dinov2", "adapter", "lora_name", "unet_name", "clip_name1", "clip_name2",
                "vae_name", "transformer", "clip_l", "t5", "vae", "character_file"}


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_every_node_is_listed_with_a_description_and_tooltips(object_info):
    for node_id in OUR_NODES:
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["description"], node_id
        assert info["category"] == "InstantCharacter"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


IMPORT_PROBE = """
import asyncio, importlib.util, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
spec = importlib.util.spec_from_file_location("pack", sys.argv[2] + "/__init__.py", submodule_search_locations=[sys.argv[2]])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
print(len(nodes), sorted(m for m in ("diffusers", "peft", "accelerate") if m in sys.modules))
"""


def test_the_template_browser_lists_and_serves_every_shipped_workflow(server):
    """The README sends users to ComfyUI's template browser: it lists the pack's workflows under the pack's folder
    name and serves each file."""
    import urllib.request

    shipped = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
    assert sorted(server.get("/workflow_templates")["ComfyUI-InstantCharacter"]) == shipped
    for name in shipped:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/ComfyUI-InstantCharacter/{name}.json",
                                    timeout=30) as response:
            assert json.load(response) == json.loads((WORKFLOWS / f"{name}.json").read_text())


def test_the_pack_loads_without_the_heavy_libraries(server):
    """ComfyUI imports every pack at start-up: ours must list its nodes without importing diffusers, PEFT or
    accelerate (they load when a node first runs)."""
    plain = server.plain_log()
    assert any("ComfyUI-InstantCharacter" in line and "seconds" in line and "IMPORT FAILED" not in line
               for line in plain.splitlines())
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", IMPORT_PROBE, str(comfyui_dir()), str(PACK)], capture_output=True,
                         text=True, cwd=comfyui_dir(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, loaded = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 10 and loaded == "[]", out.stdout


def _load(name):
    return json.loads((WORKFLOWS / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_workflow_widgets_match_the_node_schemas(name, object_info):
    workflow = _load(name)
    prompt = ui_to_api(workflow, object_info)  # raises on a missing or left-over widget value
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        assert not info.get("deprecated"), f"{name}: {node['class_type']} is deprecated in this ComfyUI"
        for input_name, kind, options in widget_inputs(info):
            value = node["inputs"].get(input_name)
            if kind == "COMBO" and isinstance(value, str) and input_name not in FILE_CHOICES:
                choices = info["input"].get("required", {}).get(input_name) or info["input"]["optional"][input_name]
                listed = choices[0] if isinstance(choices[0], list) else choices[1].get("options", [])
                assert value in listed, f"{name}: {node['class_type']}.{input_name}={value!r} not in {listed}"
    thumbnail = WORKFLOWS / name.replace(".json", ".jpg")
    assert thumbnail.is_file(), f"{name} has no thumbnail {thumbnail.name} (the Templates browser loads .jpg)"


def _fast(prompt, object_info):
    """Same graph, cheap settings: 2 steps at 64×64 (sizes from a LATENT stay as they are)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "InstantCharacterSampler":
            node["inputs"].update(steps=2, width=SIZE, height=SIZE)
    # one precision for every model of the graph (mixed ones round differently in the streaming modes):
    # fp32 if every loader offers it, else bf16; newer ComfyUIs refuse a combo value a node does not list
    loaders = [node for node in prompt.values() if "weight_dtype" in node["inputs"]]
    offered = [set(combo_options(object_info, node["class_type"], "weight_dtype")) for node in loaders]
    dtype = "fp32" if all("fp32" in o for o in offered) else "bf16"
    for node in loaders:
        node["inputs"]["weight_dtype"] = dtype
    return prompt


def _saved_images(server, entry):
    files = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    return [Image.open(server.output_dir / f["subfolder"] / f["filename"]) for f in files]


def test_every_pipeline_workflow_is_run():
    uses_sampler = {p.name for p in WORKFLOWS.glob("*.json")
                    if any(n["type"] == "InstantCharacterSampler" for n in _load(p.name)["nodes"])}
    assert uses_sampler == set(PIPELINE_WORKFLOWS)


@pytest.mark.parametrize("name", PIPELINE_WORKFLOWS)
def test_shipped_workflow_runs(server, object_info, name):
    count, size = PIPELINE_WORKFLOWS[name]
    if name in RUN_FIRST:
        first = server.run(_fast(ui_to_api(_load(RUN_FIRST[name]), object_info), object_info))
        assert first["status"]["status_str"] == "success", error_message(first) + "\n" + server.log_tail()
    entry = server.run(_fast(ui_to_api(_load(name), object_info), object_info))
    assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + server.log_tail()
    images = _saved_images(server, entry)
    assert len(images) == count
    assert all(im.size == size for im in images)


def _basic(object_info, **sampler):
    prompt = _fast(ui_to_api(_load("instantcharacter_basic.json"), object_info), object_info)
    for node in prompt.values():
        if node["class_type"] == "InstantCharacterSampler":
            node["inputs"].update(sampler)
    return prompt


def _with(prompt, class_type, **inputs):
    for node in prompt.values():
        if node["class_type"] == class_type:
            node["inputs"].update(inputs)
    return prompt


def test_bad_adapter_file_gives_our_error_and_the_server_carries_on(server, host_models, object_info):
    import torch

    bad = host_models / "ipadapter" / "ip-adapter_sd15.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(3072, 1024)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(320, 768), "1.to_v_ip.weight": torch.zeros(320, 768)}},
               bad)
    info = server.get("/object_info/InstantCharacterLoadAdapter")["InstantCharacterLoadAdapter"]
    assert "ip-adapter_sd15.bin" in info["input"]["required"]["adapter"][1]["options"]
    entry = server.run(_with(_basic(object_info), "InstantCharacterLoadAdapter", adapter="ip-adapter_sd15.bin"))
    assert entry["status"]["status_str"] == "error"
    assert "SD1.5 IP-Adapter" in error_message(entry)
    again = server.run(_basic(object_info, seed=5))
    assert again["status"]["status_str"] == "success", error_message(again)


def test_incomplete_model_folder_gives_our_error(server, host_models, object_info):
    broken = host_models / "unet" / "FLUX.1-dev-broken"
    if not broken.exists():
        shutil.copytree(host_models / "unet" / "FLUX.1-dev", broken)
        next((broken / "transformer").glob("*-00002-of-*.safetensors")).unlink()
    entry = server.run(_with(_basic(object_info), "InstantCharacterLoadFlux", model="FLUX.1-dev-broken"))
    assert entry["status"]["status_str"] == "error"
    assert "is incomplete" in error_message(entry) and "transformer/" in error_message(entry)
    again = server.run(_basic(object_info, seed=6))
    assert again["status"]["status_str"] == "success", error_message(again)


def test_size_not_multiple_of_16_is_explained(server, object_info):
    # The widget steps by 16, but an API caller (or an old workflow) can still send 72.
    entry = server.run(_basic(object_info, width=72, height=64))
    assert entry["status"]["status_str"] == "error"
    assert "width 72 is not a multiple of 16" in error_message(entry) and "use 64 or 80" in error_message(entry)


def test_cancel_stops_the_sampler_within_a_step_and_leaves_the_models_clean(server, object_info):
    before = server.run(_basic(object_info, seed=7))
    assert before["status"]["status_str"] == "success", error_message(before)
    # the yardstick, measured now on this machine: the same heavy graph run for 2 steps, start to end
    started = time.time()
    short = server.run(_basic(object_info, seed=8, steps=2, width=512, height=512, batch_size=4))
    two_steps = time.time() - started
    assert short["status"]["status_str"] == "success", error_message(short)
    # 100 times that if nothing stopped it
    # pressed 3 s after it starts: inside the denoising loop by now
    entry, stopped_after = server.cancel_while_running(
        _basic(object_info, seed=8, steps=200, width=512, height=512, batch_size=4), timeout=120)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
    assert stopped_after < 2 * two_steps, \
        f"Cancel took {stopped_after:.1f} s; a 2-step run of this graph {two_steps:.1f} s"
    # attention processors, LoRA layers and placement were restored: the same prompt gives the same picture
    after = server.run(_basic(object_info, seed=7))
    assert after["status"]["status_str"] == "success", error_message(after)
    a, b = _saved_images(server, before)[0], _saved_images(server, after)[0]
    assert list(a.getdata()) == list(b.getdata())


def test_offload_settings_give_the_same_picture_through_the_server(server, object_info):
    """On this CPU the budget and sequential code paths (T5 and transformer block streaming through flat host
    buffers into CPU "device" buffers, per-image and tiled VAE decode) run in the server and must not change the
    picture."""
    pictures = {}
    for offload, budget, fp8 in (("auto", 16.0, False), ("budget", 2.0, False), ("sequential", 16.0, False),
                                 ("budget", 2.0, True)):
        entry = server.run(_basic(object_info, seed=9, offload=offload, vram_budget_gb=budget, fp8_storage=fp8))
        assert entry["status"]["status_str"] == "success", error_message(entry)
        pictures[(offload, fp8)] = np.asarray(_saved_images(server, entry)[0], dtype=np.int16)
    reference = pictures[("auto", False)]
    assert np.array_equal(pictures[("budget", False)], reference)
    assert np.array_equal(pictures[("sequential", False)], reference)
    fp8 = pictures[("budget", True)]
    assert not np.array_equal(fp8, reference) and np.abs(fp8 - reference).mean() < 8  # close, not equal
    assert re.search(r"offload sequential, [0-9.]+ GiB streamed; VAE decode tiled", server.log_tail(400))


def test_two_characters_each_move_their_own_half_through_the_server(server, object_info):
    """The shipped two-character graph with the left or the right character's strength at 0: each character
    changes its own half of the saved picture more than the other half."""
    shipped = _fast(ui_to_api(_load("instantcharacter_two_characters.json"), object_info), object_info)
    regions = [k for k, node in shipped.items() if node["class_type"] == "InstantCharacterCharacterRegion"]
    # the left one's mask is the composite placed at x = 0
    regions.sort(key=lambda k: shipped[shipped[k]["inputs"]["mask"][0]]["inputs"]["x"])
    assert len(regions) == 2

    def picture(left, right):
        prompt = copy.deepcopy(shipped)
        prompt[regions[0]]["inputs"]["strength"], prompt[regions[1]]["inputs"]["strength"] = left, right
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + server.log_tail()
        return np.asarray(_saved_images(server, entry)[0].convert("RGB"), dtype=np.float64)

    none, left_only, right_only, both = picture(0.0, 0.0), picture(1.0, 0.0), picture(0.0, 1.0), picture(1.0, 1.0)
    half = SIZE // 2

    def moved(a, b):
        d = np.abs(a - b)
        return d[:, :half].mean(), d[:, half:].mean()

    left_moves, right_moves = moved(left_only, none), moved(right_only, none)
    print(f"\n[two characters] mean |change| of the left / right half (of 255): left character "
          f"{left_moves[0]:.2f} / {left_moves[1]:.2f}, right character {right_moves[0]:.2f} / {right_moves[1]:.2f}; "
          f"both vs left only {moved(both, left_only)[0]:.2f} on the left")
    assert left_moves[0] > 1.5 * left_moves[1] and right_moves[1] > 1.5 * right_moves[0]
    assert moved(both, left_only)[0] < moved(both, right_only)[0]
