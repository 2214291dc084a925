"""Encode Reference: pictures of the character → the character (encoder features)."""

from __future__ import annotations

from comfy_api.latest import io

from ..instantcharacter.images import FIT_MODES
from .types import CATEGORY, Character, Encoders


class EncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterEncodeReference",
            display_name="InstantCharacter Encode Reference",
            category=CATEGORY,
            description="Reads pictures of one character with SigLIP and DINOv2. Several pictures (an IMAGE batch) "
                        "are fused into one character by averaging their features, e.g. front and side views.",
            inputs=[
                Encoders.Input("encoders", tooltip="From InstantCharacter Load Image Encoders."),
                io.Image.Input("image", tooltip="One picture of the character, or a batch of pictures of the same "
                                                "character (all fused). A plain background works best."),
                io.Combo.Input("fit", options=list(FIT_MODES), default="stretch",
                               tooltip="How a non-square picture becomes square: stretch (the official behaviour, "
                                       "distorts), pad (white borders, keeps the shape), crop (centre square, may "
                                       "cut the character)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where the character is. White (1) = character, kept; black (0) = "
                                      "background, painted white. Note: the MASK of ComfyUI's Load Image is 1 where "
                                      "the PNG is TRANSPARENT, i.e. the background, so put an InvertMask node between "
                                      "Load Image's MASK and this input. One mask for all images, or one per image."),
            ],
            outputs=[Character.Output(display_name="character", tooltip="The character, for the sampler")],
        )

    @classmethod
    def execute(cls, encoders, image, fit, mask=None) -> io.NodeOutput:
        import comfy.model_management

        from ..instantcharacter.images import references_from_batch

        pictures = references_from_batch(image, mask)
        device = comfy.model_management.get_torch_device()
        encoders.to(device)
        try:
            features = encoders.encode(pictures, fit=fit)
        finally:
            encoders.to("cpu")
        return io.NodeOutput(features.to("cpu"))
