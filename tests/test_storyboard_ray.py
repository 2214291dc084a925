"""The storyboard on Ray (``--ray``): a local cluster started here (127.0.0.1, 2 CPUs) with two CPU actors gives the
pictures of the sequential run; an actor's process killed with SIGKILL mid-board is restarted by Ray, its panel drawn
again, and the board completes with every panel in the manifest once. Skipped, with the reason, without ray."""

import contextlib
import io
import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

# Ray gives its processes the machine's network address unless told to keep to the loopback one; this must be set
# before ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason='ray is not installed (pip install "ray>=2.50"; .ci/run installs it)')

from instantcharacter.__main__ import main  # noqa: E402
from instantcharacter.errors import InputError  # noqa: E402
from instantcharacter.run.storyboard_ray import PACKAGE, actor_options  # noqa: E402

STORY = "the girl wakes up\nthe girl rides a bike\nthe girl reads a book\nthe girl waves goodbye\n"
FAST = ["--candidates", "2", "--width", "32", "--height", "32", "--steps", "2", "--dtype", "fp32", "--seed", "5"]
ACTOR_LINE = re.compile(r"ray actor (\d+): \S+ pid (\d+), cpu, 1 thread$", re.M)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"py_modules": [str(PACKAGE)], "excludes": ["__pycache__"]})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray_story") / "story.txt"
    path.write_text(STORY)
    return path


@pytest.fixture(scope="module")
def character(tiny_encoders, tmp_path_factory):
    """A saved character: the driver computes no features, so every run reads the same bits."""
    from instantcharacter.files.character_file import save_character

    picture = Image.open(PACKAGE.parent / "assets" / "reference_girl.png")
    folder = tmp_path_factory.mktemp("ray_character")
    return save_character(tiny_encoders.encode([picture]), folder / "girl.safetensors")


def _args(tiny_models, story, out, *more):
    return ["--models-dir", str(tiny_models["flux"].parents[1]), "storyboard", str(story), *FAST,
            "--output-dir", str(out), *more]


def _manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def sequential(tiny_models, story, character, tmp_path_factory):
    """The board drawn here, without Ray, with the actors' one thread each (CPU matrix products split their sums by
    the thread count, which can move a pixel by one level)."""
    out = tmp_path_factory.mktemp("sequential")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(tiny_models, story, out, "--character", str(character))) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _same_board(out, sequential):
    lines = _manifest(out)
    assert [line["panel"] for line in lines] == [1, 2, 3, 4]  # each panel once, in order
    assert lines == _manifest(sequential)  # seeds, scores, files and checksums
    for line in lines:
        assert np.array_equal(_pixels(out / line["file"]), _pixels(sequential / line["file"]))
    assert np.array_equal(_pixels(out / "contact_sheet.png"), _pixels(sequential / "contact_sheet.png"))


def test_cluster_is_on_the_loopback_address(cluster):
    assert cluster.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_two_ray_actors_draw_the_pictures_of_the_sequential_run(cluster, tiny_models, story, character, sequential,
                                                                tmp_path, capsys):
    out = tmp_path / "ray"
    assert main(_args(tiny_models, story, out, "--character", str(character), "--ray", cluster, "--ray-actors",
                      "2")) == 0
    said = capsys.readouterr().out
    actors = ACTOR_LINE.findall(said)
    assert [number for number, _ in actors] == ["1", "2"], said
    drawn_by = set(re.findall(r"drawn by \S+ pid (\d+)", said))
    assert drawn_by == {pid for _, pid in actors}, said  # both actors drew panels
    _same_board(out, sequential)


class _Tee(io.StringIO):
    """What the command prints, readable while it runs."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def write(self, text):
        with self.lock:
            return super().write(text)

    def text(self):
        with self.lock:
            return self.getvalue()


def test_an_actor_killed_mid_board_loses_and_duplicates_nothing(cluster, tiny_models, story, character, sequential,
                                                                 tmp_path):
    out = tmp_path / "fault"
    printed = _Tee()
    killed = {}

    def kill_an_actor_after_the_first_panel():
        deadline = time.time() + 600
        while time.time() < deadline:
            actors = dict(ACTOR_LINE.findall(printed.text()))
            manifest = out / "manifest.jsonl"
            if len(actors) == 2 and manifest.is_file() and manifest.read_text().count("\n") >= 1:
                killed["pid"] = int(actors["2"])
                killed["panels_done"] = manifest.read_text().count("\n")
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_an_actor_after_the_first_panel)
    watcher.start()
    with contextlib.redirect_stdout(printed):
        code = main(_args(tiny_models, story, out, "--character", str(character), "--ray", cluster, "--ray-actors",
                          "2"))
    watcher.join()
    said = printed.text()
    assert code == 0, said
    assert killed and killed["panels_done"] < 4, said  # the kill came mid-board
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    first = {pid for _, pid in ACTOR_LINE.findall(said)}
    drawn_by = set(re.findall(r"drawn by \S+ pid (\d+)", said))
    assert drawn_by - first, f"no panel was drawn by the restarted actor:\n{said}"
    print(f"\n[ray] killed actor pid {killed['pid']} after {killed['panels_done']} panel(s); drawn by {drawn_by}")
    _same_board(out, sequential)


def test_more_actors_than_the_cluster_holds_is_refused(cluster):
    with pytest.raises(InputError, match="has 2 CPU core"):
        actor_options(3)
    assert actor_options(None)[0] == 1  # one machine, no GPU: one actor with both cores
    assert actor_options(2) == (2, {"num_cpus": 1, "scheduling_strategy": "SPREAD"}, 1)
