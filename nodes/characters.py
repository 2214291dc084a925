"""Save Character and Load Character: a character kept as a file in the characters model folder and used again
without the image encoders."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..instantcharacter.files.locations import CHARACTERS_FOLDER, CHARACTERS_SUBDIR
from . import folders
from .types import CATEGORY, Character

FOLDER_NOTE = (f"models/{CHARACTERS_SUBDIR.as_posix()} (ComfyUI folder name '{CHARACTERS_FOLDER}', so "
               "extra_model_paths.yaml can add more)")
log = logging.getLogger(__name__)


def preview_image(character):
    """The character's small preview as a ComfyUI IMAGE (grey when it has none)."""
    import torch

    source = character.source
    if source is None or source.preview is None:
        return torch.full((1, 64, 64, 3), 0.5)
    return source.preview.float() / 255.0


class SaveCharacter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterSaveCharacter",
            display_name="InstantCharacter Save Character",
            category=CATEGORY,
            is_output_node=True,
            description="Saves the character (the fused encoder features Encode Reference computed, after masks, "
                        "crop, fusion and any blending) as a .safetensors file in " + FOLDER_NOTE + ", with the "
                        "encoders' names and widths, the fit and weights used, and a small preview. InstantCharacter "
                        "Load Character reads it back without loading the image encoders.",
            inputs=[
                Character.Input("character", tooltip="From Encode Reference, Blend Characters or Load Character."),
                io.String.Input("filename_prefix", default="character",
                                tooltip="The file name's start; a number is added (character_00001_.safetensors). "
                                        "'heroes/anna' saves into a heroes sub-folder of the characters folder "
                                        "('heroes/' as heroes/character_…). An existing file is never replaced."),
            ],
            outputs=[io.String.Output(display_name="file",
                                      tooltip="The saved file's name, as Load Character lists it")],
        )

    @classmethod
    def execute(cls, character, filename_prefix) -> io.NodeOutput:
        from ..instantcharacter.reference.character import plain_features

        character = plain_features(character, "Save Character")  # before anything touches the disk
        from comfy_api.latest import ui

        from ..instantcharacter.files.character_file import (character_prefix, check_savable, check_save_folder,
                                                             save_numbered_character)

        check_savable(character)
        where = f"the characters folder (models/{CHARACTERS_SUBDIR.as_posix()})"
        prefix = character_prefix(filename_prefix, where)  # normalised, so the numbering counts what is there
        root = os.path.abspath(folders.download_target(CHARACTERS_FOLDER))
        check_save_folder(os.path.join(root, os.path.dirname(prefix)))
        folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, root)
        path = save_numbered_character(character, folder, name, counter)  # the next free number: never over a file
        listed = os.path.relpath(path, root).replace(os.sep, "/")
        log.info("InstantCharacter Save Character: wrote %s", path)
        return io.NodeOutput(listed, ui=ui.PreviewImage(preview_image(character), cls=cls))


class LoadCharacter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterLoadCharacter",
            display_name="InstantCharacter Load Character",
            category=CATEGORY,
            description="Loads a character saved by InstantCharacter Save Character, for the Sampler, Apply and "
                        "Blend Characters. No image encoders are loaded (about 8 GB less memory than Load Image "
                        "Encoders + Encode Reference). Files that are not character files (pickles, adapters, "
                        "LoRAs, damaged files) are refused with a message saying what they are.",
            inputs=[
                io.Combo.Input("character_file", options=folder_paths.get_filename_list(CHARACTERS_FOLDER),
                               tooltip=f"A character file in {FOLDER_NOTE}. Press R to refresh the list after "
                                       "saving a new one."),
            ],
            outputs=[Character.Output(display_name="character", tooltip="The character, for the sampler"),
                     io.Image.Output(display_name="preview",
                                     tooltip="The prepared pictures it was encoded from, small (128²)")],
        )

    @classmethod
    def fingerprint_inputs(cls, character_file):
        # a file replaced under the same name is loaded again
        path = folder_paths.get_full_path(CHARACTERS_FOLDER, character_file)
        if path is None:
            return None
        stat = os.stat(path)
        return stat.st_mtime_ns, stat.st_size

    @classmethod
    def execute(cls, character_file) -> io.NodeOutput:
        from ..instantcharacter.files.character_file import load_character

        character = load_character(folders.file_choice(CHARACTERS_FOLDER, character_file))
        return io.NodeOutput(character, preview_image(character))
