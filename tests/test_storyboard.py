"""Storyboards (instantcharacter.run.storyboard): the same board gives the same pictures, a panel drawn alone gives
its picture in the board (and so does the Sampler's generate with the winner's seed), the kept candidate is the one
with the highest of the scores it reports, progress and Cancel, clear errors, the contact sheet, the output folder
that a stopped run resumes from, and the small nodes of the native storyboard."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instantcharacter.errors import InputError
from instantcharacter.files.storyboard_folder import CONTACT_SHEET, MANIFEST, BoardFolder
from instantcharacter.reference.consistency import consistency_scores
from instantcharacter.reference.images import tensor_to_pil
from instantcharacter.run.pipeline import generate
from instantcharacter.run.settings import GenerationSettings, RunHooks
from instantcharacter.reference.character import RegionalCharacter
from instantcharacter.run.contact_sheet import contact_sheet
from instantcharacter.run.storyboard import (SEED_RANGE, Board, BoardModels, candidate_seed, panel_prompts, panel_seed,
                                             render_panel, score_references, storyboard)
from schema_reader import pack_nodes

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STORY = """# a short story
the girl wakes up in a cosy room

the girl rides a bike in the city
the girl reads a book under a tree
"""
SETTINGS = GenerationSettings("", width=32, height=32, steps=2, max_sequence_length=64)


@pytest.fixture(scope="module")
def character(tiny_encoders):
    return tiny_encoders.encode([Image.open(ASSETS / "reference_girl.png")], fit="pad")


@pytest.fixture(scope="module")
def models(tiny_flux, tiny_adapter, tiny_encoders):
    return BoardModels(tiny_flux, tiny_adapter, tiny_encoders)


@pytest.fixture(scope="module")
def board():
    return Board(panel_prompts(STORY, "watercolour"), candidates=2, seed=7, settings=SETTINGS)


@pytest.fixture(scope="module")
def drawn(models, board, character):
    steps = []
    result = storyboard(models, board, character,
                        hooks=RunHooks(on_step=lambda done, total, _: steps.append((done, total))))
    return result, steps


def test_panel_lines_skip_blanks_and_comments_and_take_the_style():
    assert panel_prompts(STORY) == ["the girl wakes up in a cosy room", "the girl rides a bike in the city",
                                    "the girl reads a book under a tree"]
    assert panel_prompts("  a cat \n#x\n", "oil painting") == ["a cat, oil painting"]
    assert panel_prompts("a cat\na dog", "ghibli style, {panel}, soft light") == [
        "ghibli style, a cat, soft light", "ghibli style, a dog, soft light"]


def test_seeds_come_from_the_board_seed_panel_and_candidate_only():
    seeds = {candidate_seed(7, p, c) for p in range(1, 50) for c in range(1, 9)}
    assert len(seeds) == 49 * 8 and all(0 <= s < SEED_RANGE for s in seeds)
    assert candidate_seed(7, 3, 2) == candidate_seed(7, 3, 2) != candidate_seed(8, 3, 2)
    assert panel_seed(7, 3) not in seeds and panel_seed(7, 3) == panel_seed(7, 3)


def test_the_same_board_twice_gives_the_same_pictures(drawn, models, board, character):
    first, _ = drawn
    again = storyboard(models, board, character)
    assert len(first.panels) == 3 and first.images.shape == (3, 32, 32, 3) and first.latents.shape == (3, 16, 4, 4)
    assert torch.equal(first.images, again.images) and torch.equal(first.latents, again.latents)
    assert [p.record() for p in first.panels] == [p.record() for p in again.panels]
    assert len({p.image.numpy().tobytes() for p in first.panels}) == 3  # three different panels


def test_a_panel_drawn_alone_and_the_sampler_with_its_seed_give_its_picture(drawn, models, board, character):
    first, _ = drawn
    alone = render_panel(models, board, character, 2)
    assert torch.equal(alone.image, first.panels[1].image) and torch.equal(alone.latent, first.latents[1])
    # the Sampler's own generate, batch size 1, with the seed the report gives
    settings = dataclasses.replace(SETTINGS, prompt=board.prompts[1], seed=alone.seed)
    sampled = generate(models.flux, models.adapter, character, settings)
    assert torch.equal(sampled.images[0], alone.image)


def test_the_kept_candidate_is_the_best_of_the_scores_it_reports(drawn, models, board, character):
    first, _ = drawn
    references, fit = score_references(character)
    assert fit == "pad" and len(references) == 1
    for panel in first.panels:
        assert panel.seeds == [candidate_seed(7, panel.number, c) for c in (1, 2)]
        assert panel.chosen == int(np.argmax(panel.scores.combined))
        assert panel.record()["candidate"] == panel.chosen + 1 and panel.record()["seed"] == panel.seed
    # the reported scores are the consistency scores of the candidates themselves
    panel = first.panels[2]
    candidates = [generate(models.flux, models.adapter, character,
                           dataclasses.replace(SETTINGS, prompt=panel.prompt, seed=s)).images[0] for s in panel.seeds]
    scores = consistency_scores(models.encoders, references, [tensor_to_pil(c) for c in candidates], fit)
    assert scores.combined == pytest.approx(panel.scores.combined, abs=1e-6)
    assert torch.equal(candidates[panel.chosen], panel.image)
    assert f"candidate {panel.chosen + 1} (seed {panel.seed})" in first.report()


def test_progress_counts_panels_candidates_and_steps(drawn):
    _, steps = drawn
    assert steps == [(n, 3 * 2 * 2) for n in range(1, 13)]


def test_cancel_stops_within_a_step_and_the_next_board_is_unchanged(drawn, models, board, character):
    seen = []

    class Cancelled(Exception):
        pass

    def cancel_at_third_step(done, total, denoised):
        seen.append(done)
        if done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        storyboard(models, board, character, hooks=RunHooks(on_step=cancel_at_third_step))
    assert seen == [1, 2, 3]
    assert torch.equal(render_panel(models, board, character, 1).image, drawn[0].panels[0].image)


def test_bad_boards_are_refused_by_name_before_drawing(models, character, tiny_flux):
    with pytest.raises(InputError, match="no panel lines"):
        storyboard(models, Board(panel_prompts("# only a comment\n\n"), settings=SETTINGS), character)
    with pytest.raises(InputError, match="has 5 panels; at most 4"):
        storyboard(models, Board(["a"] * 5, settings=SETTINGS), character, panel_limit=4)
    with pytest.raises(InputError, match="candidates must be between 1 and 16"):
        storyboard(models, Board(["a"], candidates=0, settings=SETTINGS), character)
    long_line = " ".join(["girl"] * 80)
    steps = []
    with pytest.raises(InputError, match=r"Panel 2 is 81 T5 tokens long with the style; T5 reads at most 64"):
        storyboard(models, Board(["a girl", long_line], settings=SETTINGS), character,
                   hooks=RunHooks(on_step=lambda *a: steps.append(a)))
    assert steps == []  # refused before the first step
    with pytest.raises(InputError, match="Storyboard works on characters without a region"):
        storyboard(models, Board(["a girl"], settings=SETTINGS), RegionalCharacter(character, torch.ones(8, 8)))
    with pytest.raises(InputError, match="keeps no prepared pictures"):
        storyboard(models, Board(["a girl"], settings=SETTINGS), dataclasses.replace(character, source=None))


def _cells(sheet, count, columns, side):
    """The pictures at their places on a sheet of unscaled panels (the layout contact_sheet draws)."""
    gap, band = max(4, round(side * 0.03)), max(14, round(side * 0.12))
    for index in range(count):
        row, column = divmod(index, columns)
        x, y = gap + column * (side + gap), gap + row * (side + band + gap)
        yield np.asarray(sheet.crop((x, y, x + side, y + side)))


def test_the_contact_sheet_shows_the_panels_in_order_in_a_grid(drawn):
    first, _ = drawn
    sheet = first.contact_sheet()
    pictures = [np.asarray(tensor_to_pil(p.image)) for p in first.panels]
    assert sheet.size == (2 * (32 + 4) + 4, 2 * (32 + 14 + 4) + 4)  # 3 panels: 2 × 2
    assert all(np.array_equal(cell, picture) for cell, picture in zip(_cells(sheet, 3, 2, 32), pictures))
    numbers = np.asarray(sheet.crop((4, 36, 36, 50)).convert("L"))
    assert numbers.min() < 100  # the caption band under panel 1 has text
    big = contact_sheet([Image.new("RGB", (600, 450), "red")] * 300)  # 18 columns: cells shrink to fit 8192
    assert max(big.size) <= 8192 + 8192 // 20 and big.width > 18 * 400


# --- the output folder ------------------------------------------------------------------------------------------

def _record(number, prompt):
    return {"panel": number, "prompt": prompt, "seed": number, "scores": [0.5]}


def _picture(value):
    return Image.new("RGB", (8, 8), (value, value, value))


def _lines(folder):
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def test_the_folder_resumes_from_the_panels_whose_pictures_are_whole(tmp_path):
    prompts = ["one", "two", "three", "four"]
    folder = BoardFolder(tmp_path / "board", "id1", prompts)
    assert folder.open() == {}
    for n in (1, 2, 3):
        folder.add_panel(_record(n, prompts[n - 1]), _picture(n))
    line = _lines(tmp_path / "board")[0]
    assert line["file"] == "panel_001.png" and line["board"] == "id1"
    assert line["sha256"] == hashlib.sha256((tmp_path / "board" / "panel_001.png").read_bytes()).hexdigest()
    # a stop while panel 4's picture was being written, and while a line was: neither is taken as done
    (tmp_path / "board" / ".panel_004.png.999.partial").write_bytes(b"\x89PNG half")
    with open(tmp_path / "board" / MANIFEST, "a") as f:
        f.write('{"panel": 4, "prompt": "fo')
    # panel 2's picture damaged, panel 3's removed
    damaged = tmp_path / "board" / "panel_002.png"
    damaged.write_bytes(damaged.read_bytes()[:20])
    (tmp_path / "board" / "panel_003.png").unlink()
    again = BoardFolder(tmp_path / "board", "id1", prompts)
    assert set(again.open()) == {1}
    assert [n for n, _ in again.dropped] == [2, 3]
    assert "not the picture the manifest recorded" in again.dropped[0][1] and "missing" in again.dropped[1][1]
    assert [r["panel"] for r in _lines(tmp_path / "board")] == [1]  # rewritten: one line per done panel
    assert not list((tmp_path / "board").glob(".*.partial"))
    for n in (2, 3, 4):
        again.add_panel(_record(n, prompts[n - 1]), _picture(n))
    assert [r["panel"] for r in _lines(tmp_path / "board")] == [1, 2, 3, 4]
    assert [np.asarray(p)[0, 0, 0] for p in again.panel_pictures()] == [1, 2, 3, 4]
    again.write_contact_sheet(contact_sheet(again.panel_pictures()))
    assert (tmp_path / "board" / CONTACT_SHEET).is_file()


def test_a_changed_prompt_is_drawn_again_and_another_boards_folder_is_refused(tmp_path):
    folder = BoardFolder(tmp_path, "id1", ["one", "two"])
    folder.open()
    for n, prompt in ((1, "one"), (2, "two")):
        folder.add_panel(_record(n, prompt), _picture(n))
    edited = BoardFolder(tmp_path, "id1", ["one", "two, at night"])
    assert set(edited.open()) == {1} and edited.dropped == [(2, "its prompt changed")]
    shortened = BoardFolder(tmp_path, "id1", ["one"])
    assert set(shortened.open()) == {1}
    with pytest.raises(InputError, match="holds panels of another board"):
        BoardFolder(tmp_path, "id2", ["one"]).open()
    assert [r["panel"] for r in _lines(tmp_path)] == [1]  # the refusal changed nothing


def test_a_manifest_line_naming_a_file_elsewhere_is_not_done(tmp_path):
    folder = BoardFolder(tmp_path / "b", "id1", ["one"])
    folder.open()
    outside = tmp_path / "elsewhere.png"
    _picture(1).save(outside)
    line = {**_record(1, "one"), "file": "../elsewhere.png", "board": "id1",
            "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(line) + "\n")
    again = BoardFolder(tmp_path / "b", "id1", ["one"])
    assert again.open() == {} and "not a panel file of this folder" in again.dropped[0][1]


# --- the nodes of the native storyboard -------------------------------------------------------------------------

def test_storyboard_panels_gives_one_prompt_and_one_seed_per_panel():
    with pack_nodes() as nodes:
        prompts, seeds = nodes.StoryboardPanels.execute(STORY, "{panel}, comic style", 5)
        with pytest.raises(ValueError, match="no panel lines"):  # the pack's own copy of InputError
            nodes.StoryboardPanels.execute("\n# nothing\n", "", 5)
        with pytest.raises(ValueError, match="at most 100"):
            nodes.StoryboardPanels.execute("a\n" * 101, "", 5)
    assert prompts == [f"{line}, comic style" for line in panel_prompts(STORY)]
    assert seeds == [panel_seed(5, n) for n in (1, 2, 3)]


def test_contact_sheet_node_lays_out_a_list_of_pictures(drawn):
    first, _ = drawn
    one_per_panel = [p.image[None] for p in first.panels]
    with pack_nodes() as nodes:
        (sheet,) = nodes.ContactSheet.execute(one_per_panel, [0], ["a", "b", "c"])
        (row,) = nodes.ContactSheet.execute([first.images], [3])
    assert sheet.shape == (1, 2 * (32 + 14 + 4) + 4, 2 * (32 + 4) + 4, 3)
    assert row.shape == (1, 32 + 14 + 4 + 4, 3 * (32 + 4) + 4, 3)
    pictures = [np.asarray(tensor_to_pil(p.image)) for p in first.panels]
    for laid_out, columns in ((sheet, 2), (row, 3)):
        cells = _cells(tensor_to_pil(laid_out[0]), 3, columns, 32)
        assert all(np.array_equal(cell, picture) for cell, picture in zip(cells, pictures))


def test_ray_is_never_imported_until_a_board_runs_on_it():
    """Ray is optional: the pack, its nodes' core and the storyboard's Ray module import without it."""
    import subprocess
    import sys

    probe = ("import sys; import instantcharacter.run.storyboard_ray, instantcharacter.__main__; "
             "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_the_throughput_benchmark_estimate_is_the_arithmetic_it_states():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "storyboard_throughput.py"), "--estimate-only"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # 10,000 panels on 100 GPUs: 100 each × 4 candidates × 28 steps × 84 ms, plus 42.4 GB read at 2 GB/s once
    assert "4 × 28 × 0.084 s = 9.4 s | 100 × 9.4 s + 21 s = 16.0 min" in out.stdout
