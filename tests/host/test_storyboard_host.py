"""Storyboards in a real ComfyUI (``COMFYUI_DIR``): the shipped pipeline workflow (InstantCharacter Storyboard) saves
the chosen panels, the contact sheet and the report, with the progress bar and live previews counting panels ×
candidates × steps; bad panel text is refused by name; the shipped native workflow runs through ComfyUI's list
execution (Storyboard Panels → CLIP Text Encode and KSampler once per panel → Consistency Score keeps the best of
each panel's batch → Contact Sheet) on the full-width skeleton files."""

import copy
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui import ComfyServer, error_message, ui_to_api
from test_characters_and_previews import _previews, _progress
from test_native_server import (PICTURES, SIZE, _native_prompt, native_models, skeletons)  # noqa: F401 (fixtures)
from test_pack_in_comfyui import _fast, _load

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = "instantcharacter_storyboard.json"
NATIVE = ROOT / "workflows" / "instantcharacter_native_storyboard.json"
PANELS = "# three panels\nthe girl wakes up\n\nthe girl rides a bike\nthe girl reads a book"
CANDIDATES, STEPS = 2, 2


def _node(prompt, class_type):
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def _images(server, entry, node_id):
    files = entry["outputs"].get(node_id, {}).get("images", [])
    return [Image.open(server.output_dir / f["subfolder"] / f["filename"]).convert("RGB") for f in files]


@pytest.fixture(scope="module")
def previewing_server(host_models, tmp_path_factory):
    """A server with live previews on (latent2rgb), as a user who turned them on has."""
    workdir = tmp_path_factory.mktemp("comfyui_storyboard")
    with ComfyServer(workdir, host_models, env={"HF_ENDPOINT": "http://127.0.0.1:9"},
                     args=("--preview-method", "latent2rgb")) as srv:
        shutil.copy(ROOT / "assets" / "reference_girl.png", srv.input_dir / "reference_girl.png")
        yield srv


@pytest.fixture(scope="module")
def object_info(previewing_server):
    return previewing_server.get("/object_info")


def _board(object_info, **inputs):
    prompt = _fast(ui_to_api(_load(PIPELINE), object_info), object_info)
    prompt[_node(prompt, "InstantCharacterStoryboard")]["inputs"].update(
        {"panels": PANELS, "candidates": CANDIDATES, "steps": STEPS, "width": SIZE, "height": SIZE, **inputs})
    return prompt


@pytest.fixture(scope="module")
def board_run(previewing_server, object_info):
    prompt = _board(object_info)
    started = time.time()
    entry, messages = previewing_server.run_watched(prompt)
    assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + previewing_server.log_tail()
    return prompt, entry, messages, time.time() - started


def test_the_storyboard_workflow_saves_the_panels_the_contact_sheet_and_the_report(board_run, previewing_server):
    prompt, entry, _, _ = board_run
    saves = sorted((k for k, n in prompt.items() if n["class_type"] == "SaveImage"),
                   key=lambda k: prompt[k]["inputs"]["images"][1])  # fed by output 0 (panels), then 1 (sheet)
    panels, sheets = (_images(previewing_server, entry, k) for k in saves)
    assert len(panels) == 3 and all(p.size == (SIZE, SIZE) for p in panels)
    assert len({p.tobytes() for p in panels}) == 3
    assert len(sheets) == 1 and sheets[0].size == (2 * (SIZE + 4) + 4, 2 * (SIZE + 14 + 4) + 4)
    sheet = np.asarray(sheets[0], dtype=np.int16)
    # panel 1 at the top left (SaveImage truncates to 8 bits where the sheet rounds: one level at most)
    assert np.abs(sheet[4:4 + SIZE, 4:4 + SIZE] - np.asarray(panels[0], dtype=np.int16)).max() <= 1
    report = entry["outputs"][_node(prompt, "PreviewAny")]["text"][0]
    lines = report.splitlines()
    assert [line.split(":")[0] for line in lines] == ["panel 1", "panel 2", "panel 3"]
    assert "→ candidate" in lines[1] and "the girl rides a bike, storybook illustration" in lines[1]


def test_the_progress_bar_and_live_previews_count_panels_candidates_and_steps(board_run):
    prompt, _, messages, _ = board_run
    total = 3 * CANDIDATES * STEPS
    steps = _progress(messages, _node(prompt, "InstantCharacterStoryboard"))
    assert steps[-1] == (total, total) and [value for value, _ in steps] == list(range(1, total + 1))
    assert len(_previews(messages)) == total


def test_cancel_stops_the_board_and_the_server_draws_the_next_one(board_run, previewing_server, object_info):
    whole_board = board_run[3]  # the yardstick, measured in this run: 3 panels × 2 candidates × 2 steps
    server = previewing_server
    # hours if nothing stopped it; pressed 3 s after it starts: inside the first panel's steps by now
    entry, stopped_after = server.cancel_while_running(
        _board(object_info, panels="\n".join(f"scene {n}" for n in range(100)), candidates=16, steps=200, seed=99),
        timeout=300)
    print(f"\n[storyboard] Cancel: stopped {stopped_after:.1f} s after the press; the whole 12-step board took "
          f"{whole_board:.1f} s")
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
    assert stopped_after < whole_board, f"Cancel took {stopped_after:.1f} s; a whole 12-step board {whole_board:.1f} s"
    again = server.run(_board(object_info, seed=5))
    assert again["status"]["status_str"] == "success", error_message(again)


@pytest.mark.parametrize("panels, message", [
    ("# only comments\n\n", "no panel lines"),
    ("\n".join(f"panel {n}" for n in range(101)), "has 101 panels; at most 100"),
    ("the girl\n" + " ".join(["girl"] * 600), "T5 tokens long with the style; T5 reads at most 512"),
])
def test_bad_panel_text_is_refused_by_name_and_the_server_carries_on(previewing_server, object_info, panels, message):
    entry = previewing_server.run(_board(object_info, panels=panels))
    assert entry["status"]["status_str"] == "error"
    assert message in error_message(entry) and "InputError" in error_message(entry)


# --- the native storyboard -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_board(native_models, skeletons, tmp_path_factory):  # noqa: F811
    """The shipped native storyboard with two panels of two candidates, 2 steps at 64×64, on the skeletons."""
    workdir = tmp_path_factory.mktemp("comfyui_native_storyboard")
    with ComfyServer(workdir, native_models, env={"HF_ENDPOINT": "http://127.0.0.1:9"}) as srv:
        for name in PICTURES:
            shutil.copy(ROOT / "assets" / name, srv.input_dir / name)
        object_info = srv.get("/object_info")
        prompt = _native_prompt(object_info, skeletons, workflow=NATIVE)
        panels_id = _node(prompt, "InstantCharacterStoryboardPanels")
        prompt[panels_id]["inputs"].update(panels="the girl wakes up\nthe girl rides a bike", style="")
        prompt[_node(prompt, "CLIPTextEncode")]["inputs"]["text"] = [panels_id, 0]  # _native_prompt set one text
        prompt[_node(prompt, "EmptySD3LatentImage")]["inputs"]["batch_size"] = CANDIDATES
        started = time.time()
        entry = srv.run(copy.deepcopy(prompt), timeout=1800)
        print(f"\n[native storyboard] {entry['status']['status_str']} in {time.time() - started:.0f} s", flush=True)
        assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + srv.log_tail(120)
        yield srv, prompt, entry


def test_the_native_storyboard_keeps_the_best_of_each_panel_and_lays_them_out(native_board):
    srv, prompt, entry = native_board
    saves = {prompt[k]["inputs"]["filename_prefix"]: k for k, n in prompt.items() if n["class_type"] == "SaveImage"}
    panels = _images(srv, entry, saves["InstantCharacter_storyboard/panel"])
    sheets = _images(srv, entry, saves["InstantCharacter_storyboard/contact_sheet"])
    assert len(panels) == 2 and all(p.size == (SIZE, SIZE) for p in panels)
    assert panels[0].tobytes() != panels[1].tobytes()  # each panel its own prompt and seed
    assert all(np.asarray(p).std() > 0 for p in panels)
    assert len(sheets) == 1 and sheets[0].size == (2 * (SIZE + 4) + 4, SIZE + 14 + 4 + 4)
    sheet = np.asarray(sheets[0], dtype=np.int16)
    for index, panel in enumerate(panels):
        x = 4 + index * (SIZE + 4)
        assert np.abs(sheet[4:4 + SIZE, x:x + SIZE] - np.asarray(panel, dtype=np.int16)).max() <= 1
    reports = entry["outputs"][_node(prompt, "PreviewAny")]["text"]
    assert len(reports) == 2  # one Consistency Score run per panel, over that panel's batch of candidates
    for report in reports:
        means = [float(m) for m in re.findall(r"^image \d+: .*mean ([0-9.]+)$", report, re.M)]
        assert len(means) == CANDIDATES, report
        assert f"best: image {int(np.argmax(means))}" in report
    panels_id = _node(prompt, "InstantCharacterStoryboardPanels")
    assert prompt[_node(prompt, "KSampler")]["inputs"]["seed"] == [panels_id, 1]  # one seed per panel
