"""Save / Load Character and the Sampler's live previews in a real ComfyUI (``COMFYUI_DIR``): the shipped
encode → save workflow, the load → sample workflow in a second graph (the same picture as encoding in the same
graph), a wrong file refused in the node, and preview images over the websocket exactly when previews are on."""

import io
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from comfyui import ComfyServer, comfyui_dir, error_message, ui_to_api
from test_pack_in_comfyui import SIZE, _fast, _load, _saved_images

SAVE = "instantcharacter_save_character.json"
LOAD = "instantcharacter_load_character.json"
STEPS = 3
JPEG = 1  # the image type after a PREVIEW_IMAGE message's event type
PREVIEW_IMAGE = 1  # ComfyUI's binary event types: a preview, and one with metadata (clients that ask for it)
PREVIEW_WITH_METADATA = 4


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _characters_folder(host_models):
    return host_models / "instantcharacter" / "characters"


def _listed(server) -> list:
    info = server.get("/object_info/InstantCharacterLoadCharacter")["InstantCharacterLoadCharacter"]
    spec = info["input"]["required"]["character_file"]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def _node(prompt, class_type):
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


@pytest.fixture(scope="module")
def saved(server, object_info, host_models):
    """The shipped save workflow, run: its history entry and the name of the file it wrote."""
    folder = _characters_folder(host_models)
    before = set(folder.rglob("*.safetensors")) if folder.exists() else set()
    entry = server.run(_fast(ui_to_api(_load(SAVE), object_info), object_info))
    assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + server.log_tail()
    written = set(folder.rglob("*.safetensors")) - before
    assert len(written) == 1, written
    return entry, next(iter(written)).relative_to(folder).as_posix()


def _load_prompt(object_info, name, **sampler):
    prompt = _fast(ui_to_api(_load(LOAD), object_info), object_info)
    prompt[_node(prompt, "InstantCharacterLoadCharacter")]["inputs"]["character_file"] = name
    prompt[_node(prompt, "InstantCharacterSampler")]["inputs"].update(sampler)
    return prompt


def test_the_save_workflow_writes_a_character_file_and_shows_its_preview(saved, server, host_models):
    from instantcharacter.files.character_file import load_character

    entry, name = saved
    assert name.startswith("girl_") and name in _listed(server)
    character = load_character(_characters_folder(host_models) / name)
    assert character.source.settings == {"fit": "pad", "crop_to_character": True, "margin": 0.1, "pictures": 2,
                                         "weights": [1.0, 1.0]}
    identity = character.source.encoders
    assert (identity.siglip, identity.dinov2) == ("siglip-so400m-patch14-384", "dinov2-giant")
    save_id = _node(ui_to_api(_load(SAVE), server.get("/object_info")), "InstantCharacterSaveCharacter")
    shown = entry["outputs"][save_id]["images"]
    assert len(shown) == 2 and all(image["type"] == "temp" for image in shown)  # the two prepared pictures


def _encode_in_one_graph(object_info, load_prompt):
    """The load graph with Load Character replaced by the save graph's encoding nodes."""
    encode = {f"e{node_id}": node for node_id, node in _fast(ui_to_api(_load(SAVE), object_info), object_info).items()
              if node["class_type"] != "InstantCharacterSaveCharacter"}
    for node in encode.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][key] = [f"e{value[0]}", value[1]]
    prompt = {k: v for k, v in load_prompt.items() if v["class_type"] not in ("InstantCharacterLoadCharacter",
                                                                              "PreviewImage")}
    prompt[_node(prompt, "InstantCharacterSampler")]["inputs"]["character"] = [
        _node(encode, "InstantCharacterEncodeReference"), 0]
    return {**prompt, **encode}


def test_the_load_workflow_in_a_second_graph_gives_the_picture_of_encoding_in_one(saved, server, object_info):
    _, name = saved
    load_prompt = _load_prompt(object_info, name, seed=21)
    loaded = server.run(load_prompt)
    assert loaded["status"]["status_str"] == "success", error_message(loaded) + "\n" + server.log_tail()
    preview_id = _node(load_prompt, "PreviewImage")
    assert len(loaded["outputs"][preview_id]["images"]) == 2  # Load Character's preview output
    encoded = server.run(_encode_in_one_graph(object_info, load_prompt))
    assert encoded["status"]["status_str"] == "success", error_message(encoded)
    a, b = _saved_images(server, loaded), _saved_images(server, encoded)
    assert len(a) == len(b) == 1 and a[0].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_a_file_that_is_not_a_character_is_refused_in_the_node_and_the_server_carries_on(saved, server, host_models,
                                                                                        object_info):
    _, name = saved
    shutil.copy(host_models / "loras" / "flux_style_lora.safetensors", _characters_folder(host_models) / "style.safetensors")
    assert "style.safetensors" in _listed(server)
    prompt = {"1": {"class_type": "InstantCharacterLoadCharacter", "inputs": {"character_file": "style.safetensors"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "CharacterFileError" in message and "style.safetensors is not an InstantCharacter character file" in message
    assert "looks like a LoRA" in message
    again = server.run({**prompt, "1": {**prompt["1"], "inputs": {"character_file": name}}})
    assert again["status"]["status_str"] == "success", error_message(again)


def _previews(messages) -> list[bytes]:
    return [payload for kind, event, payload in messages if kind == "binary" and
            event in (PREVIEW_IMAGE, PREVIEW_WITH_METADATA)]


def _progress(messages, node_id) -> list[tuple[int, int]]:
    return [(data["value"], data["max"]) for kind, event, data in messages
            if kind == "json" and event == "progress" and data.get("node") == node_id]


def test_with_previews_off_no_preview_is_sent_and_the_progress_bar_still_moves(saved, server, object_info):
    """The shared server runs with ComfyUI's default, --preview-method none."""
    prompt = _load_prompt(object_info, saved[1], steps=STEPS, seed=22)
    entry, messages = server.run_watched(prompt)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert _previews(messages) == []
    steps = _progress(messages, _node(prompt, "InstantCharacterSampler"))
    assert steps and steps[-1] == (STEPS, STEPS), steps


def test_the_frontends_per_run_preview_choice_is_honoured_where_comfyui_reads_it(saved, server, object_info):
    """Newer frontends send their live-preview setting with each prompt; ComfyUI v0.33 applies it for that run."""
    if "def set_preview_method" not in (comfyui_dir() / "latent_preview.py").read_text():
        pytest.skip("this ComfyUI has no per-run preview method (only --preview-method)")
    prompt = _load_prompt(object_info, saved[1], steps=STEPS, seed=23)
    entry, messages = server.run_watched(prompt, extra_data={"preview_method": "latent2rgb"})
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert len(_previews(messages)) == STEPS
    again = _load_prompt(object_info, saved[1], steps=STEPS, seed=24)  # another seed: a cached result sends nothing
    entry, messages = server.run_watched(again, extra_data={"preview_method": "default"})  # back to none
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert _previews(messages) == [] and _progress(messages, _node(again, "InstantCharacterSampler"))


@pytest.fixture(scope="module")
def taesd_decoder(comfy, host_models):
    """A TAESD decoder for FLUX (models/vae_approx/taef1_decoder) with random weights, in ComfyUI's own layout."""
    import torch
    from comfy.taesd.taesd import Decoder
    from safetensors.torch import save_file

    decoder = Decoder(latent_channels=16)  # ComfyUI's layers skip weight init: set every weight here
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in decoder.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else None
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5 if fan_in else torch.zeros(p.shape))
    path = host_models / "vae_approx" / "taef1_decoder.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def previews_by_method(saved, host_models, taesd_decoder, tmp_path_factory):
    """A Sampler run watched over the websocket on a server started with each preview method."""
    found = {}
    for method in ("latent2rgb", "taesd"):
        workdir = tmp_path_factory.mktemp(f"comfyui_{method}")
        with ComfyServer(workdir, host_models, env={"HF_ENDPOINT": "http://127.0.0.1:9"},
                         args=("--preview-method", method)) as srv:
            object_info = srv.get("/object_info")
            prompt = _load_prompt(object_info, saved[1], steps=STEPS, seed=22)
            started = time.time()
            entry, messages = srv.run_watched(prompt)
            assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + srv.log_tail()
            found[method] = dict(previews=_previews(messages), log=srv.plain_log(), seconds=time.time() - started,
                                 progress=_progress(messages, _node(prompt, "InstantCharacterSampler")))
    return found


@pytest.mark.parametrize("method", ["latent2rgb", "taesd"])
def test_with_previews_on_the_sampler_sends_the_picture_forming_at_every_step(previews_by_method, method):
    run = previews_by_method[method]
    previews = run["previews"]
    assert len(previews) == STEPS, f"{len(previews)} previews for {STEPS} steps"
    pictures = []
    for payload in previews:
        assert int.from_bytes(payload[:4], "big") == JPEG
        pictures.append(np.asarray(Image.open(io.BytesIO(payload[4:])).convert("RGB"), dtype=np.int16))
    assert all(p.shape == pictures[0].shape and p.shape[0] == p.shape[1] for p in pictures)  # SIZE × SIZE, scaled
    assert len(set(previews)) == STEPS  # one picture per step, not one picture repeated
    assert run["progress"][-1] == (STEPS, STEPS)
    assert "TAESD previews enabled, but could not find" not in run["log"]


def test_taesd_previews_are_taesd_and_not_the_latent2rgb_fallback(previews_by_method):
    def last(method):
        return np.asarray(Image.open(io.BytesIO(previews_by_method[method]["previews"][-1][4:])).convert("RGB"),
                          dtype=np.int16)

    assert np.abs(last("taesd") - last("latent2rgb")).mean() > 5
