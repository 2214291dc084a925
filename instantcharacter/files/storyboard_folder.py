"""A storyboard's output folder: the chosen panels as numbered PNG files, ``manifest.jsonl`` and the contact sheet,
written so that a run stopped at any moment (a crash, Ctrl-C, a killed process or machine) resumes where it was.

Every file is written under a temporary name in the same folder, flushed to the disk and renamed, so a name never
holds half a file. A panel's manifest line is appended only once its picture is in place, and records the
picture's SHA-256. When a run starts, a line counts as done only if its picture is still there with that checksum
and its prompt is still the panel's prompt; other lines are dropped (the panel is drawn again) and the manifest is
rewritten with the lines that stand, one per panel, in panel order. A manifest made with other board settings (seed,
size, character …) is refused rather than mixed with this board.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..errors import InputError

MANIFEST = "manifest.jsonl"
CONTACT_SHEET = "contact_sheet.png"
PARTIAL = ".partial"
PANEL_PREFIX = "panel_"


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; elsewhere the rename alone)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class BoardFolder:
    """The output folder of one board: ``board_id`` names the settings that make its pictures
    (:func:`..run.storyboard.board_identity`), ``prompts`` its panels' prompts (panel 1 first)."""

    def __init__(self, folder: str | os.PathLike, board_id: str, prompts: Sequence[str]):
        self.folder = Path(folder)
        self.board_id = board_id
        self.prompts = list(prompts)
        self.done: dict[int, dict] = {}
        self.dropped: list[tuple[int, str]] = []  # (panel, why) of manifest lines not taken as done

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    def panel_name(self, number: int) -> str:
        return f"{PANEL_PREFIX}{number:0{max(3, len(str(len(self.prompts))))}d}.png"

    def open(self) -> dict[int, dict]:
        """Create the folder or read what an earlier run of this board finished; returns the done panels' records
        by panel number. Leftover temporary files of a stopped run are removed."""
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"{self.folder} is a file, not a folder: give a folder for the storyboard.")
        lines = self.manifest.read_text(encoding="utf-8").splitlines() if self.manifest.is_file() else []
        records = [self._parse(line) for line in lines if line.strip()]
        if any(r is not None and r["board"] != self.board_id for r in records):
            raise InputError(f"{self.folder} holds panels of another board ({self.manifest.name} was written with "
                             "another seed, size, steps, candidates, character or models). Give another "
                             "--output-dir, or delete that folder to start this board there.")
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(f".*{PARTIAL}"):
            leftover.unlink(missing_ok=True)
        for record in records:
            if record is None:
                continue  # a line cut short by a stop while it was written
            number = record["panel"]
            why = self._invalid(record)
            if why:
                self.dropped.append((number, why))
            elif number not in self.done:
                self.done[number] = record
        if len(self.done) != len(records):
            self.sort_manifest()
        return dict(self.done)

    def sort_manifest(self) -> None:
        """Rewrite the manifest with one line per done panel, in panel order (panels drawn again after a resume
        were appended at its end)."""
        kept = [self.done[n] for n in sorted(self.done)]
        self._write_atomic(MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode())

    @staticmethod
    def _parse(line: str) -> dict | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        types = {"panel": int, "prompt": str, "file": str, "sha256": str, "board": str}
        if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in types.items()):
            return None
        return record

    def _invalid(self, record: dict) -> str:
        number, name = record["panel"], record["file"]
        if not 1 <= number <= len(self.prompts):
            return "no longer on the board"
        if record["prompt"] != self.prompts[number - 1]:
            return "its prompt changed"
        if Path(name).name != name or not name.startswith(PANEL_PREFIX):
            return f"the manifest names {name!r}, not a panel file of this folder"
        path = self.folder / name
        if not path.is_file():
            return f"{name} is missing"
        if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
            return f"{name} is not the picture the manifest recorded (damaged or changed)"
        return ""

    def add_panel(self, record: dict, picture: Image.Image) -> dict:
        """Write a finished panel's picture, then append its manifest line (``record`` plus the file, its checksum
        and the board); returns the line."""
        number = record["panel"]
        name = self.panel_name(number)
        data = _png(picture)
        self._write_atomic(name, data)
        line = {**record, "file": name, "sha256": hashlib.sha256(data).hexdigest(), "board": self.board_id}
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[number] = line
        return line

    def panel_pictures(self) -> list[Image.Image]:
        """The finished panels' pictures in panel order (every panel must be done)."""
        missing = [n for n in range(1, len(self.prompts) + 1) if n not in self.done]
        if missing:
            raise InputError(f"Panels {missing} are not finished yet.")
        pictures = []
        for number in range(1, len(self.prompts) + 1):
            with Image.open(self.folder / self.done[number]["file"]) as picture:
                pictures.append(picture.convert("RGB"))
        return pictures

    def write_contact_sheet(self, picture: Image.Image) -> Path:
        self._write_atomic(CONTACT_SHEET, _png(picture))
        return self.folder / CONTACT_SHEET

    def _write_atomic(self, name: str, data: bytes) -> None:
        partial = self.folder / f".{name}.{os.getpid()}{PARTIAL}"
        try:
            with open(partial, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, self.folder / name)
            _sync_folder(self.folder)
        finally:
            partial.unlink(missing_ok=True)
