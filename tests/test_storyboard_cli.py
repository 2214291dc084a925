"""``python -m instantcharacter storyboard``: numbered panels, a contact sheet and a manifest; a run killed with
SIGKILL after two panels finishes when run again, with every panel in the manifest once and the pictures of an
uninterrupted run; clear errors before any model loads."""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instantcharacter.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
STORY = "# four panels\nthe girl wakes up\nthe girl rides a bike\n\nthe girl reads a book\nthe girl waves goodbye\n"
FAST = ["--candidates", "2", "--width", "32", "--height", "32", "--steps", "2", "--dtype", "fp32", "--seed", "3"]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    path = tmp_path_factory.mktemp("story") / "story.txt"
    path.write_text(STORY)
    return path


def _args(models, story, out, *more):
    return ["--models-dir", str(models), "storyboard", str(story), *FAST, "--output-dir", str(out), *more]


def _manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, story, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(_args(tiny_models["flux"].parents[1], story, out)) == 0
    return out


def test_the_board_writes_numbered_panels_a_contact_sheet_and_a_manifest(uninterrupted, tiny_models, story, capsys):
    lines = _manifest(uninterrupted)
    assert [line["panel"] for line in lines] == [1, 2, 3, 4]
    assert [line["file"] for line in lines] == [f"panel_00{n}.png" for n in (1, 2, 3, 4)]
    assert lines[2]["prompt"] == "the girl reads a book" and len(lines[2]["scores"]) == 2
    assert lines[2]["seed"] == lines[2]["seeds"][lines[2]["candidate"] - 1]
    assert all(_pixels(uninterrupted / line["file"]).shape == (32, 32, 3) for line in lines)
    sheet = Image.open(uninterrupted / "contact_sheet.png")
    assert sheet.size == (2 * (32 + 4) + 4, 2 * (32 + 14 + 4) + 4)
    # run again: nothing left to draw, no model loaded, nothing changed
    before = {p.name: p.read_bytes() for p in uninterrupted.iterdir()}
    capsys.readouterr()
    assert main(_args(tiny_models["flux"].parents[1], story, uninterrupted)) == 0
    said = capsys.readouterr().out
    assert "4 of 4 panels already done" in said and "models loaded" not in said and "scores" not in said
    assert {p.name: p.read_bytes() for p in uninterrupted.iterdir()} == before


def test_a_run_killed_after_two_panels_finishes_when_run_again(tiny_models, story, uninterrupted, tmp_path, capsys):
    models = tiny_models["flux"].parents[1]
    out = tmp_path / "board"
    command = [sys.executable, "-m", "instantcharacter", *_args(models, story, out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and process.poll() is None:
            if manifest.is_file() and manifest.read_text().count("\n") >= 2:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        process.wait(60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    before = _manifest(out)
    assert 2 <= len(before) < 4 and not (out / "contact_sheet.png").exists()

    assert main(_args(models, story, out)) == 0
    said = capsys.readouterr().out
    assert f"{len(before)} of 4 panels already done" in said
    lines = _manifest(out)
    assert [line["panel"] for line in lines] == [1, 2, 3, 4]  # every panel once
    assert lines == _manifest(uninterrupted)  # seeds, scores, files and checksums of the uninterrupted run
    for line in lines:
        assert np.array_equal(_pixels(out / line["file"]), _pixels(uninterrupted / line["file"]))
    assert np.array_equal(_pixels(out / "contact_sheet.png"), _pixels(uninterrupted / "contact_sheet.png"))
    assert not list(out.glob(".*partial"))


def test_a_damaged_panel_is_drawn_again(tiny_models, story, uninterrupted, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    for path in uninterrupted.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    damaged = out / "panel_002.png"
    damaged.write_bytes(damaged.read_bytes()[:100])  # as a file cut short would be
    assert main(_args(tiny_models["flux"].parents[1], story, out)) == 0
    said = capsys.readouterr().out
    assert "panel 2: drawing it again (panel_002.png is not the picture the manifest recorded" in said
    assert "3 of 4 panels already done" in said and "panel 2: scores" in said and "panel 1: scores" not in said
    assert _manifest(out) == _manifest(uninterrupted)
    assert np.array_equal(_pixels(damaged), _pixels(uninterrupted / "panel_002.png"))


def test_a_saved_character_draws_a_board(tiny_models, tiny_encoders, tmp_path):
    from instantcharacter.files.character_file import save_character

    character = save_character(tiny_encoders.encode([Image.open(ROOT / "assets" / "reference_girl.png")]),
                               tmp_path / "girl.safetensors")
    story = tmp_path / "one.txt"
    story.write_text("the girl on a beach\n")
    assert main(_args(tiny_models["flux"].parents[1], story, tmp_path / "out", "--character", str(character),
                      "--candidates", "1")) == 0
    assert [line["panel"] for line in _manifest(tmp_path / "out")] == [1]


def test_cli_errors_come_before_any_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    assert main(["--models-dir", str(tmp_path), "storyboard", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no panel lines" in err and "Models not found" not in err
    assert main(["--models-dir", str(tmp_path), "storyboard", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: not found" in capsys.readouterr().err
    story = tmp_path / "story.txt"
    story.write_text("a girl\n")
    assert main(["--models-dir", str(tmp_path), "storyboard", str(story), "--candidates", "0"]) == 2
    assert "candidates must be between 1 and 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--models-dir", str(tmp_path), "storyboard", str(story), "--character", "a.safetensors", "--reference",
              "b.png"])
    assert "--character and --reference" in capsys.readouterr().err


def test_ray_without_ray_says_how_to_install_it(tmp_path, capsys):
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here; tests/test_storyboard_ray.py runs the Ray path")
    story = tmp_path / "story.txt"
    story.write_text("a girl\n")
    assert main(["--models-dir", str(tmp_path), "storyboard", str(story), "--ray", "auto"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "ray>=2.50"' in err and "Models not found" not in err


def test_the_readme_story_and_command_make_numbered_panels_a_sheet_and_a_manifest(tiny_models, tmp_path, monkeypatch,
                                                                                 capsys):
    """The README's story.txt and storyboard line as written (the models folder from COMFYUI_MODELS_DIR), with only
    the size, steps and candidates made small for the CPU: the last value of an option counts."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Storyboards", 1)[1]
    story = section.split("```text\n", 1)[1].split("```", 1)[0]
    command = next(line for line in section.splitlines() if line.startswith(".venv/bin/python -m instantcharacter "
                                                                           "storyboard"))
    args = shlex.split(command.split("-m instantcharacter", 1)[1])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMFYUI_MODELS_DIR", str(tiny_models["flux"].parents[1]))
    (tmp_path / "story.txt").write_text(story)
    assert main([*args, "--width", "32", "--height", "32", "--steps", "1", "--candidates", "2", "--dtype",
                 "fp32"]) == 0
    out = tmp_path / "output" / "story"
    lines = _manifest(out)
    assert [line["panel"] for line in lines] == [1, 2, 3, 4]
    assert lines[1]["prompt"] == "the girl rides her bicycle through a busy market street, storybook illustration, " \
                                 "soft watercolour"
    assert all((out / f"panel_00{n}.png").is_file() for n in (1, 2, 3, 4)) and (out / "contact_sheet.png").is_file()
    assert f"wrote 4 panels, {Path('output') / 'story' / 'contact_sheet.png'}" in capsys.readouterr().out
