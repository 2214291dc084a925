"""Encode Reference (pictures → the character) and Blend Characters."""

from __future__ import annotations

from comfy_api.latest import io

from ..instantcharacter.reference.encoders import parse_weights
from ..instantcharacter.reference.images import FIT_MODES
from .devices import encoders_on_device
from .types import CATEGORY, Character, Encoders


class EncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterEncodeReference",
            display_name="InstantCharacter Encode Reference",
            category=CATEGORY,
            description="Reads pictures of one character with SigLIP and DINOv2. Several pictures (an IMAGE batch) "
                        "are fused into one character by averaging their features, e.g. front and side views. "
                        "The 'prepared' output shows what the encoders see.",
            inputs=[
                Encoders.Input("encoders", tooltip="From InstantCharacter Load Image Encoders."),
                io.Image.Input("image", tooltip="One picture of the character, or a batch of pictures of the same "
                                                "character (all fused). A plain background works best."),
                io.Combo.Input("fit", options=list(FIT_MODES), default="stretch",
                               tooltip="How a non-square picture becomes square: stretch (the official behaviour, "
                                       "distorts), pad (white borders, keeps the shape), crop (centre square, may "
                                       "cut the character)."),
                io.Boolean.Input("crop_to_character", default=False,
                                 tooltip="Crop each picture to the character's bounding box (from the mask, else the "
                                         "non-white pixels) before fitting, so a small character fills the view."),
                io.Float.Input("margin", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="With crop_to_character: space kept around the character, as a fraction of "
                                       "its longer side."),
                io.String.Input("weights", default="", optional=True,
                                tooltip="Optional: one weight per picture of the batch, e.g. '1, 1, 0.5' (a mean "
                                        "weighted this way). Empty = all equal."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where the character is. White (1) = character, kept; black (0) = "
                                      "background, painted white. Note: the MASK of ComfyUI's Load Image is 1 where "
                                      "the PNG is TRANSPARENT, i.e. the background, so put an InvertMask node between "
                                      "Load Image's MASK and this input. One mask for all images, or one per image."),
            ],
            outputs=[Character.Output(display_name="character", tooltip="The character, for the sampler"),
                     io.Image.Output(display_name="prepared", tooltip="The squares the encoders read (384²)")],
        )

    @classmethod
    def execute(cls, encoders, image, fit, crop_to_character, margin, weights="", mask=None) -> io.NodeOutput:
        import torch

        from ..instantcharacter.reference.images import LOW_RES, pil_to_tensor, prepare_reference, split_batch

        pairs = split_batch(image, mask)
        squares = [prepare_reference(p, fit, m, crop_to_character, margin) for p, m in pairs]
        with encoders_on_device(encoders):
            features = encoders.encode_squares(squares, parse_weights(weights, len(squares)))
        prepared = torch.stack([pil_to_tensor(sq.resize((LOW_RES, LOW_RES))) for sq in squares])
        return io.NodeOutput(features.to("cpu"), prepared)


class BlendCharacters(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterBlendCharacters",
            display_name="InstantCharacter Blend Characters",
            category=CATEGORY,
            description="Mixes two characters into one by interpolating their encoder features "
                        "(identity interpolation).",
            inputs=[
                Character.Input("character_a", tooltip="The first character (ratio 0 = only this one)."),
                Character.Input("character_b", tooltip="The second character (ratio 1 = only this one)."),
                io.Float.Input("ratio", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="How much of character_b: 0 = all A, 1 = all B."),
            ],
            outputs=[Character.Output(display_name="character", tooltip="The blended character")],
        )

    @classmethod
    def execute(cls, character_a, character_b, ratio) -> io.NodeOutput:
        from ..instantcharacter.reference.encoders import ReferenceFeatures

        return io.NodeOutput(ReferenceFeatures.blend([character_a, character_b], [1 - ratio, ratio]))
