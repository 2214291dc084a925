"""The shipped native workflow through a real ComfyUI server (``COMFYUI_DIR``), with ComfyUI's own loaders.

UNETLoader, DualCLIPLoader and VAELoader fix the model widths, so the graph runs on full-width skeleton files
(:mod:`instantcharacter.testing.skeletons`: FLUX.1-dev with 1+1 blocks, T5-XXL fp8, CLIP-L, an adapter for that
FLUX; generated once and cached) and the full-width random VAE and tiny image encoders of the other host tests.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui import ComfyServer, combo_options, comfyui_dir, error_message, ui_to_api

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "instantcharacter_native_ksampler.json"
TWO_CHARACTERS = ROOT / "workflows" / "instantcharacter_native_two_characters.json"
REFERENCE = "reference_girl.png"
PICTURES = ("reference_girl.png", "reference_girl_wave.png")
SIZE = 64
STEPS = 2
# lines in which ComfyUI says a file did not fit the model it built, or that memory was not freed
LOADER_COMPLAINTS = ("unet missing", "unet unexpected", "clip missing", "Missing VAE keys",
                     "left over keys in diffusion model")
LEAK = "memory leak"


@pytest.fixture(scope="module")
def skeletons():
    from instantcharacter.testing.skeletons import ensure_skeletons

    start = time.time()
    paths = ensure_skeletons(log=lambda line: print(f"\n[skeletons] {line}", flush=True))
    print(f"\n[skeletons] ready in {time.time() - start:.0f} s: {paths['flux'].parent}")
    return paths


@pytest.fixture(scope="module")
def native_models(host_models, skeletons, tmp_path_factory):
    """A models tree of links: the skeletons, the full-width VAE and the tiny image encoders."""
    root = tmp_path_factory.mktemp("native_models")
    links = {
        f"unet/{skeletons['flux'].name}": skeletons["flux"],
        f"text_encoders/{skeletons['clip_l'].name}": skeletons["clip_l"],
        f"text_encoders/{skeletons['t5'].name}": skeletons["t5"],
        f"ipadapter/{skeletons['adapter'].name}": skeletons["adapter"],
        "vae/ae.safetensors": host_models / "vae" / "ae.safetensors",
        "clip_vision/siglip-so400m-patch14-384": host_models / "clip_vision" / "siglip-so400m-patch14-384",
        "clip_vision/dinov2-giant": host_models / "clip_vision" / "dinov2-giant",
    }
    for rel, target in links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target, target_is_directory=target.is_dir())
    return root


SECOND_DEVICE_PLUGIN = '''"""Test plugin: ComfyUI sees a second device, a CPU standing in for a second GPU (tensors on
torch.device("cpu", 1) are plain CPU tensors; to ComfyUI's multi-GPU code it is another device)."""
import torch

import comfy.model_management

comfy.model_management.get_all_torch_devices = lambda exclude_current=False: [torch.device("cpu"),
                                                                               torch.device("cpu", 1)]
NODE_CLASS_MAPPINGS = {}
'''


@pytest.fixture(scope="module")
def native_server(native_models, tmp_path_factory):
    """The server, with a second (stand-in) device for the MultiGPU CFG Split graph; graphs without ComfyUI's
    multi-GPU nodes never use it."""
    workdir = tmp_path_factory.mktemp("comfyui_native")
    (workdir / "custom_nodes").mkdir()
    (workdir / "custom_nodes" / "standin_second_device.py").write_text(SECOND_DEVICE_PLUGIN)
    start = time.time()
    with ComfyServer(workdir, native_models, env={"HF_ENDPOINT": "http://127.0.0.1:9"}) as srv:
        print(f"\n[native server] started in {time.time() - start:.0f} s", flush=True)
        for name in PICTURES:
            shutil.copy(ROOT / "assets" / name, srv.input_dir / name)
        yield srv


@pytest.fixture(scope="module")
def object_info(native_server):
    return native_server.get("/object_info")


def _prompt_text(workflow):
    return next(n["widgets_values"][0] for n in json.loads(workflow.read_text())["nodes"] if n["type"] == "CLIPTextEncode")


def _native_prompt(object_info, skeletons, weight=None, workflow=WORKFLOW, weights=None):
    """A shipped native workflow in API form: the skeleton files picked, 2 steps at 64×64, the rest as shipped.
    ``weights``: the Apply nodes' weights in node-id order. Every workflow gets the single-character one's
    prompt text, so ComfyUI's cache encodes it with T5-XXL once (minutes on this CPU) for all of them."""
    prompt = copy.deepcopy(ui_to_api(json.loads(workflow.read_text()), object_info))
    applies = sorted((k for k, n in prompt.items() if n["class_type"] == "InstantCharacterApply"), key=int)
    for key, value in zip(applies, weights or []):
        prompt[key]["inputs"]["weight"] = value
    files = {("UNETLoader", "unet_name"): skeletons["flux"].name,
             ("DualCLIPLoader", "clip_name1"): skeletons["clip_l"].name,
             ("DualCLIPLoader", "clip_name2"): skeletons["t5"].name,
             ("VAELoader", "vae_name"): "ae.safetensors",
             ("InstantCharacterLoadAdapter", "adapter"): skeletons["adapter"].name}
    seen = set()
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        for (class_type, name), value in files.items():
            if kind == class_type:
                inputs[name] = value
                seen.add(class_type)
        if kind == "KSampler":
            inputs["steps"] = STEPS
        if kind == "EmptySD3LatentImage":
            inputs.update(width=SIZE, height=SIZE)
        if kind == "InstantCharacterApply" and weight is not None:
            inputs["weight"] = weight
        if kind == "LoadImage":
            assert inputs["image"] in PICTURES
        if kind == "CLIPTextEncode":
            inputs["text"] = _prompt_text(WORKFLOW)
    assert seen == {class_type for class_type, _ in files}, seen
    # post only values the nodes offer (v0.33 refuses others)
    for node in prompt.values():
        for name, value in node["inputs"].items():
            offered = combo_options(object_info, node["class_type"], name)
            if isinstance(value, str) and offered is not None:
                assert value in offered, (node["class_type"], name, value, offered)
    return prompt


def _picture(server, entry):
    files = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert len(files) == 1, files
    f = files[0]
    return np.asarray(Image.open(server.output_dir / f["subfolder"] / f["filename"]).convert("RGB"), dtype=np.float64)


def _run(server, prompt, label):
    start = time.time()
    entry = server.run(prompt, timeout=900)
    took = time.time() - start
    print(f"\n[native server] {label}: {entry['status']['status_str']} in {took:.0f} s", flush=True)
    assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + server.log_tail(120)
    return _picture(server, entry)


DETECT_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_detection, comfy.sd, comfy.utils
flux = comfy.utils.load_torch_file(sys.argv[2])
config = comfy.model_detection.model_config_from_unet(flux, "")
unet = {k: v for k, v in config.unet_config.items() if isinstance(v, (bool, int, float, str, list))}
encoders = [comfy.sd.detect_te_model(comfy.utils.load_torch_file(p)).name for p in sys.argv[3:]]
print(json.dumps({"config": type(config).__name__, "unet": unet, "text_encoders": encoders}))
"""


def test_comfyui_detects_the_skeletons_as_flux_dev_clip_l_and_t5_xxl(skeletons):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", DETECT_PROBE, str(comfyui_dir()), str(skeletons["flux"]),
                          str(skeletons["clip_l"]), str(skeletons["t5"])],
                         capture_output=True, text=True, cwd=comfyui_dir(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n[detection] {found}")
    assert found["config"] == "Flux"  # FLUX.1-dev (schnell has no guidance_in and is FluxSchnell)
    unet = found["unet"]
    assert unet["image_model"] == "flux" and unet["guidance_embed"] is True
    assert (unet["hidden_size"], unet["num_heads"], unet["depth"], unet["depth_single_blocks"]) == (3072, 24, 1, 1)
    assert (unet["context_in_dim"], unet["vec_in_dim"], unet["in_channels"]) == (4096, 768, 16)
    assert found["text_encoders"] == ["CLIP_L", "T5_XXL"]


@pytest.fixture(scope="module")
def pictures(native_server, object_info, skeletons):
    """The shipped graph (character weight 0.9), the same with weight 0, then the shipped one again."""
    return {
        "shipped": _run(native_server, _native_prompt(object_info, skeletons), "native workflow, weight 0.9"),
        "weight 0": _run(native_server, _native_prompt(object_info, skeletons, weight=0.0), "weight 0"),
        "again": _run(native_server, _native_prompt(object_info, skeletons), "weight 0.9 again"),
    }


def test_the_shipped_native_workflow_saves_a_picture(pictures, native_server):
    picture = pictures["shipped"]
    assert picture.shape == (SIZE, SIZE, 3)
    assert np.isfinite(picture).all() and picture.std() > 0, "a blank picture (NaN or constant output)"
    log = native_server.plain_log()
    assert "invalid value encountered" not in log, "NaN in the decoded picture:\n" + native_server.log_tail(80)
    complaints = [line for line in log.splitlines() if any(c in line for c in LOADER_COMPLAINTS)]
    assert not complaints, "a skeleton file does not fit ComfyUI's model:\n" + "\n".join(complaints)[:3000]


def test_weight_zero_changes_the_picture_and_the_model_comes_back_clean(pictures):
    difference = np.abs(pictures["shipped"] - pictures["weight 0"]).mean()
    print(f"\n[native server] mean abs difference, weight 0.9 vs 0: {difference:.3f} (of 255)")
    assert difference > 0
    # the patched clone left ComfyUI's MODEL unchanged: the first graph gives its picture again
    assert np.array_equal(pictures["shipped"], pictures["again"])


def test_the_server_log_has_no_memory_leak_warning(pictures, native_server):
    leaks = [line for line in native_server.plain_log().splitlines() if LEAK in line]
    assert not leaks, "\n".join(leaks)


@pytest.fixture(scope="module")
def two_character_pictures(native_server, object_info, skeletons, pictures):
    def run(weights, label):
        return _run(native_server, _native_prompt(object_info, skeletons, workflow=TWO_CHARACTERS, weights=weights),
                    label)

    return {"both": run(None, "two characters"), "left only": run([0.9, 0.0], "left character only"),
            "none": run([0.0, 0.0], "two characters, both weights 0")}


def test_the_two_character_workflow_runs_and_each_character_acts(two_character_pictures):
    both, left, none = (two_character_pictures[k] for k in ("both", "left only", "none"))
    assert both.shape == (SIZE, SIZE, 3) and np.isfinite(both).all() and both.std() > 0
    right_acts = np.abs(both - left).mean()
    left_acts = np.abs(left - none).mean()
    print(f"\n[native server] two characters: the right one moves the picture by {right_acts:.3f}, "
          f"the left one by {left_acts:.3f} (of 255)")
    assert right_acts > 0 and left_acts > 0


@pytest.fixture(scope="module")
def split_pictures(native_server, object_info, skeletons, pictures):
    """The shipped graph at CFG 2 (so the negative pass runs too), as shipped and with ComfyUI's MultiGPU CFG
    Split between Apply and KSampler (the two passes on two devices at once), with the character and at
    weight 0."""
    if "MultiGPU_WorkUnits" not in object_info:
        pytest.skip("this ComfyUI has no MultiGPU CFG Split (v0.22 and newer)")

    def prompt(weight, split):
        graph = _native_prompt(object_info, skeletons, weight=weight)
        [sampler] = [k for k, n in graph.items() if n["class_type"] == "KSampler"]
        graph[sampler]["inputs"]["cfg"] = 2.0
        if split:
            graph["900"] = {"class_type": "MultiGPU_WorkUnits",
                            "inputs": {"model": graph[sampler]["inputs"]["model"], "max_gpus": 2}}
            graph[sampler]["inputs"]["model"] = ["900", 0]
        return graph

    return {"one device": _run(native_server, prompt(None, False), "CFG 2, one device"),
            "split": _run(native_server, prompt(None, True), "CFG 2, MultiGPU CFG Split"),
            "split, weight 0": _run(native_server, prompt(0.0, True), "CFG 2, MultiGPU CFG Split, weight 0")}


def test_the_native_workflow_through_multigpu_cfg_split_keeps_the_character(split_pictures, native_server):
    one, split, off = (split_pictures[k] for k in ("one device", "split", "split, weight 0"))
    acts = np.abs(split - off).mean()
    same = np.abs(split - one).max()
    print(f"\n[native server] CFG split: the character moves the picture by {acts:.3f} (of 255); split vs one "
          f"device: max difference {same:.0f}")
    assert acts > 0 and same <= 1  # float rounding of the split passes may move a pixel by one level
    log = native_server.plain_log()
    assert "Creating deepclone of InstantCharacterAdapter for cpu:1" in log  # the second device got its own
