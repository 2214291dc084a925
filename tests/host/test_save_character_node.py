"""Save Character inside a real ComfyUI (in-process): its file names come from ComfyUI's own save-path helper,
and no prefix a careless or hostile user types replaces a saved character, writes outside the characters folder
or ends in a raw exception."""

import importlib
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PACK = "instantcharacter_pack_native"  # the pack as the ``pack`` fixture imports it, with its own copy of the core


def _core(module: str):
    return importlib.import_module(f"{PACK}.instantcharacter.{module}")


@pytest.fixture(scope="module")
def InputError(pack):
    return _core("errors").InputError


@pytest.fixture
def save_node(pack, tmp_path):
    """The pack's Save Character node writing into ``tmp_path/characters`` (ComfyUI's temp folder, where the
    preview goes, in ``tmp_path/temp``); ComfyUI's folders are restored afterwards."""
    import folder_paths

    from instantcharacter.files.locations import CHARACTERS_FOLDER

    characters = importlib.import_module(f"{PACK}.nodes.characters")
    saved_paths = folder_paths.folder_names_and_paths[CHARACTERS_FOLDER]
    saved_temp = folder_paths.get_temp_directory()
    root = tmp_path / "characters"
    folder_paths.folder_names_and_paths[CHARACTERS_FOLDER] = ([str(root)], {".safetensors"})
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    try:
        yield characters.SaveCharacter, root
    finally:
        folder_paths.folder_names_and_paths[CHARACTERS_FOLDER] = saved_paths
        folder_paths.set_temp_directory(saved_temp)


@pytest.fixture(scope="module")
def girl(pack, tiny_models):
    """A character encoded by the pack's own copy of the core (Save Character checks what it is given)."""
    from PIL import Image

    encoders = _core("files.encoder_files").load_reference_encoders(tiny_models["siglip"], tiny_models["dinov2"])
    return encoders.encode([Image.open(ASSETS / "reference_girl.png")])


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("prefix,first,second", [
    ("heroes/anna/", "heroes/anna/character_00001_.safetensors", "heroes/anna/character_00002_.safetensors"),
    ("bob/.", "bob/character_00001_.safetensors", "bob/character_00002_.safetensors"),
    ("heroes/..", "character_00001_.safetensors", "character_00002_.safetensors"),
    ("", "character_00001_.safetensors", "character_00002_.safetensors"),
    (".", "character_00001_.safetensors", "character_00002_.safetensors"),
    ("heroes//anna", "heroes/anna_00001_.safetensors", "heroes/anna_00002_.safetensors"),
])
def test_saving_twice_keeps_both_characters(save_node, girl, prefix, first, second):
    """Before: ComfyUI counted existing files with the un-normalised prefix, both saves got _00001_ and the second
    replaced the first ('' and '.' saved hidden ._00001_ files)."""
    node, root = save_node
    listed = node.execute(girl, prefix)[0]
    before = _files(root)
    assert listed == first and list(before) == [first]
    again = node.execute(girl, prefix)[0]
    after = _files(root)
    assert again == second and sorted(after) == sorted([first, second])
    assert after[first] == before[first]


def test_a_file_already_at_the_counted_name_is_never_replaced(save_node, girl, monkeypatch):
    """The name ComfyUI's helper counts can be taken by the time the file is written (another save, a copy): the
    character goes to the next free number instead."""
    import folder_paths

    node, root = save_node
    (root / "heroes").mkdir(parents=True)
    taken = root / "heroes" / "anna_00001_.safetensors"
    taken.write_bytes(b"someone else's file")
    counted = folder_paths.get_save_image_path

    def counted_from_one(prefix, output_dir, *args):
        folder, name, _, subfolder, filename = counted(prefix, output_dir, *args)
        return folder, name, 1, subfolder, filename

    monkeypatch.setattr(folder_paths, "get_save_image_path", counted_from_one)
    assert node.execute(girl, "heroes/anna")[0] == "heroes/anna_00002_.safetensors"
    assert taken.read_bytes() == b"someone else's file"


@pytest.mark.parametrize("prefix,says", [
    ("../outside", "leads out of the characters folder"),
    ("heroes/../../outside", "leads out of the characters folder"),
    ("..", "leads out of the characters folder"),
    ("/tmp/abs", "is an absolute path"),
    ("anna\0evil", "NUL character"),
    (".hidden", "hidden file"),
    ("x" * 237, "too long"),
    ("taken.safetensors/anna", "is a file, so"),
])
def test_a_prefix_that_cannot_be_saved_is_refused_in_our_words_and_writes_nothing(save_node, girl, tmp_path,
                                                                                 InputError, prefix, says):
    """Before: ComfyUI's bare 'Saving image outside the output folder', ValueError (NUL), OSError (name too long),
    NotADirectoryError (a file used as a folder)."""
    node, root = save_node
    root.mkdir(parents=True)
    (root / "taken.safetensors").write_bytes(b"a file")
    with pytest.raises(InputError, match=says):
        node.execute(girl, prefix)
    assert _files(root) == {"taken.safetensors": b"a file"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["characters"]  # nothing beside it either


def test_the_longest_prefix_a_file_name_holds_saves(save_node, girl):
    """Before: a 236-character prefix failed with OSError 'File name too long' (the temporary name was longer)."""
    node, root = save_node
    prefix = "a" * 236  # + _00001_.safetensors = 255 bytes, the most a file name may have
    assert node.execute(girl, prefix)[0] == f"{prefix}_00001_.safetensors"
    assert [p.name for p in root.iterdir()] == [f"{prefix}_00001_.safetensors"]


def test_region_strength_nan_or_infinite_is_refused_by_the_node(pack, girl, InputError):
    """ComfyUI's min/max check lets NaN through to the node (before: a region of strength NaN gave NaN pictures)."""
    regions = importlib.import_module(f"{PACK}.nodes.regions")
    mask = torch.ones(1, 64, 64)
    for strength in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InputError, match="strength must be a finite number"):
            regions.CharacterRegion.execute(girl, mask, strength)
    with pytest.raises(InputError, match="IMAGE .* not a MASK"):
        regions.CharacterRegion.execute(girl, torch.rand(32, 32, 3), 1.0)
