"""Character Region and Combine Characters: several characters in one picture, each in its own region."""

from __future__ import annotations

from comfy_api.latest import io

from .types import CATEGORY, Character

MORE_CHARACTERS = (3, 4)


class CharacterRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterCharacterRegion",
            display_name="InstantCharacter Character Region",
            category=CATEGORY,
            description="Confines a character to a part of the picture: in every attention layer its effect is "
                        "multiplied by the mask, resized to the picture (soft edges are kept). Combine several "
                        "with Combine Characters for the Sampler, or give one to Apply (native).",
            inputs=[
                Character.Input("character", tooltip="From InstantCharacter Encode Reference."),
                io.Mask.Input("mask", tooltip="Where this character goes: white = here, black = not here, grey = "
                                              "weaker. Stretched to the generated picture's size, so draw it at the "
                                              "picture's aspect ratio (e.g. SolidMask + MaskComposite)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Multiplies the Sampler's subject_scale (or Apply's weight) for this "
                                       "character alone: balance two characters with it (1 = as set there)."),
            ],
            outputs=[Character.Output(display_name="character", tooltip="The character with its region")],
        )

    @classmethod
    def execute(cls, character, mask, strength) -> io.NodeOutput:
        from ..instantcharacter.errors import InputError
        from ..instantcharacter.reference.character import RegionalCharacter, characters_in
        from ..instantcharacter.run.regions import check_region_mask

        members = characters_in(character)
        if len(members) != 1:
            raise InputError("Character Region takes one character; this input holds combined characters. Give "
                             "each character its region first, then combine them.")
        if members[0].mask is not None:
            raise InputError("This character already has a region (from another Character Region). Connect the "
                             "Encode Reference output instead, or draw one mask for the region you want.")
        return io.NodeOutput(RegionalCharacter(members[0].features, check_region_mask(mask), float(strength)))


class CombineCharacters(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        more = [Character.Input(f"character_{n}", optional=True,
                                tooltip="Optional: another character, with or without a region.")
                for n in MORE_CHARACTERS]
        return io.Schema(
            node_id="InstantCharacterCombineCharacters",
            display_name="InstantCharacter Combine Characters",
            category=CATEGORY,
            description="Puts up to four characters into one picture: connect the output to the Sampler's "
                        "character (or to Apply). Each acts in its own region (Character Region); where regions "
                        "overlap the characters share the strength instead of adding up. A character without a "
                        "region acts on the whole picture. Name each character's place in the prompt.",
            inputs=[
                Character.Input("character_1", tooltip="A character, usually from Character Region."),
                Character.Input("character_2", tooltip="Another character, usually from Character Region."),
                *more,
            ],
            outputs=[Character.Output(display_name="characters", tooltip="The characters, for the Sampler or Apply")],
        )

    @classmethod
    def execute(cls, character_1, character_2, character_3=None, character_4=None) -> io.NodeOutput:
        from ..instantcharacter.reference.character import Characters, characters_in

        given = [c for c in (character_1, character_2, character_3, character_4) if c is not None]
        return io.NodeOutput(Characters(tuple(m for c in given for m in characters_in(c))))
