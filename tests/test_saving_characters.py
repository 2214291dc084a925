"""Saving a character never replaces a file: not the API, not Save Character's numbering, not the command line's
--save-character (which replaces a character file only with --overwrite); a path that cannot be written is named
before any encoder runs. (The node inside a real ComfyUI: tests/host/test_save_character_node.py.)"""

from pathlib import Path

import pytest
import torch
from PIL import Image

from instantcharacter.__main__ import main
from instantcharacter.errors import InputError
from instantcharacter.files.character_file import (character_prefix, load_character, save_character,
                                                   save_numbered_character)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def girl(tiny_encoders):
    return tiny_encoders.encode([Image.open(ROOT / "assets" / "reference_girl_front.png")])


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_save_never_replaces_a_file_unless_asked_and_then_only_a_character_file(girl, tiny_encoders, tmp_path):
    """Before: save_character wrote over whatever was at the path."""
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"my notes")
    with pytest.raises(InputError, match="already exists and is never replaced"):
        save_character(girl, notes)
    with pytest.raises(InputError, match="is not a character file, so it is not overwritten"):
        save_character(girl, notes, overwrite=True)
    assert notes.read_bytes() == b"my notes"

    first = save_character(girl, tmp_path / "girl.safetensors")
    other = tiny_encoders.encode([Image.open(ROOT / "assets" / "reference_girl_wave.png")])
    with pytest.raises(InputError, match="already exists"):
        save_character(other, first)
    assert _same(load_character(first), girl)
    save_character(other, first, overwrite=True)
    assert _same(load_character(first), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["girl.safetensors", "notes.safetensors"]  # no leftovers


def test_numbered_saves_take_the_next_free_number(girl, tmp_path):
    taken = tmp_path / "anna_00001_.safetensors"
    taken.write_bytes(b"someone else's file")
    assert save_numbered_character(girl, tmp_path, "anna", 1).name == "anna_00002_.safetensors"
    assert save_numbered_character(girl, tmp_path, "anna", 1).name == "anna_00003_.safetensors"
    assert taken.read_bytes() == b"someone else's file"


def test_a_name_of_the_longest_allowed_length_saves(girl, tmp_path):
    """Before: the temporary name beside a 255-byte name was longer than a file name may be (OSError)."""
    path = tmp_path / ("a" * 236 + "_00001_.safetensors")
    assert len(path.name) == 255
    assert _same(load_character(save_character(girl, path)), girl)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("prefix,normal", [
    ("heroes/anna", "heroes/anna"), ("heroes/anna/", "heroes/anna/character"), ("bob/.", "bob/character"),
    ("heroes/..", "character"), ("", "character"), (".", "character"), ("  anna ", "anna"),
    ("heroes//anna", "heroes/anna"), ("a/./b/../c", "a/c"), ("%year%/anna", "%year%/anna"),
])
def test_prefixes_are_normalised_so_the_numbering_counts_the_files_there(prefix, normal):
    assert character_prefix(prefix) == normal


@pytest.mark.parametrize("prefix,says", [
    ("..", "leads out of"), ("../x", "leads out of"), ("a/../../x", "leads out of"), ("/etc/x", "absolute path"),
    ("a\0b", "NUL"), (".x", "hidden file"), ("heroes/.x", "hidden file"), ("a" * 237, "too long"),
    ("d" * 256 + "/x", "too long"),
])
def test_prefixes_that_cannot_be_saved_are_refused_in_our_words(prefix, says):
    with pytest.raises(InputError, match=says):
        character_prefix(prefix)


def _cli(models, *args):
    return main(["--models-dir", str(models), "generate", "--prompt", "a girl", "--width", "16", "--height", "16",
                 "--steps", "1", "--dtype", "fp32", *args])


@pytest.mark.parametrize("case", ["folder", "under a file", "unwritable", "existing character", "existing other",
                                  "other with --overwrite"])
def test_save_character_targets_are_checked_before_any_encoder_runs(tmp_path, tiny_models, girl, capsys, case):
    """Before: a folder, a file in the way or an unwritable place raised a traceback after the encoders ran, and an
    existing file that was not a character file was overwritten. The models are all there: what stops the run is
    the check, before anything is loaded (nothing written, no picture)."""
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("a file")
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"my notes")
    saved = save_character(girl, tmp_path / "girl.safetensors")
    before = {p: p.read_bytes() for p in (notes, saved)}
    target, extra, says = {
        "folder": (tmp_path / "folder.safetensors", [], "is a folder"),
        "under a file": (tmp_path / "file" / "girl.safetensors", [], "is a file, so"),
        "unwritable": (Path("/proc/girl.safetensors"), [], "cannot be written"),
        "existing character": (saved, [], "already exists and is never replaced"),
        "existing other": (notes, [], "already exists and is never replaced"),
        "other with --overwrite": (notes, ["--overwrite"], "is not a character file, so it is not overwritten"),
    }[case]
    out = tmp_path / "out"
    assert _cli(tiny_models["flux"].parents[1], "--save-character", str(target), "--output-dir", str(out), *extra) == 2
    printed = capsys.readouterr()
    assert says in printed.err and "Traceback" not in printed.err, printed.err
    assert "models loaded" not in printed.out and not out.exists()
    assert {p: p.read_bytes() for p in before} == before


def test_overwrite_replaces_a_character_file(tmp_path, tiny_models, girl, capsys):
    saved = save_character(girl, tmp_path / "girl.safetensors")
    side = ROOT / "assets" / "reference_girl_side.png"
    assert _cli(tiny_models["flux"].parents[1], "--reference", str(side), "--save-character", str(saved),
                "--overwrite", "--output-dir", str(tmp_path / "out")) == 0
    assert f"wrote {saved}" in capsys.readouterr().out
    assert not _same(load_character(saved), girl)  # the side view's character now
