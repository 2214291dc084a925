"""Encode Reference (pictures → the character) and Blend Characters."""

from __future__ import annotations

from comfy_api.latest import io

from ..instantcharacter.errors import InputError
from ..instantcharacter.reference.character import parse_weights, preparation
from ..instantcharacter.reference.images import FIT_MODES, LOW_RES, pil_to_tensor, prepare_reference, split_batch
from .devices import encoders_on_device
from .types import CATEGORY, Character, Encoders


EXTRA_VIEWS = (2, 3, 4)  # image_2/mask_2 … image_4/mask_4: more views without a batch node


class EncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        extra_views = []
        for n in EXTRA_VIEWS:
            extra_views += [
                io.Image.Input(f"image_{n}", optional=True,
                               tooltip="Optional: another picture (or batch) of the same character, fused with the "
                                       "others. Any size: it need not match image."),
                io.Mask.Input(f"mask_{n}", optional=True,
                              tooltip=f"Optional: where the character is in image_{n}, as mask is for image (white = "
                                      f"character; InvertMask after Load Image's MASK). Needs image_{n}."),
            ]
        return io.Schema(
            node_id="InstantCharacterEncodeReference",
            display_name="InstantCharacter Encode Reference",
            category=CATEGORY,
            description="Reads pictures of one character with SigLIP and DINOv2 and fuses them into one character "
                        "by averaging their features, e.g. front and side views: the pictures of image (one, or an "
                        "IMAGE batch) and of image_2, image_3, image_4, which may each have their own size and "
                        "mask. The 'prepared' output shows what the encoders see.",
            inputs=[
                Encoders.Input("encoders", tooltip="From InstantCharacter Load Image Encoders."),
                io.Image.Input("image", tooltip="One picture of the character, or a batch of pictures of the same "
                                                "character (all fused). A plain background works best. More views "
                                                "of another size go to image_2 … image_4."),
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
                                tooltip="Optional: one weight per picture, e.g. '1, 1, 0.5' (a mean weighted this "
                                        "way), counting the pictures of image first, then image_2, image_3, "
                                        "image_4. Empty = all equal."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where the character is in image. White (1) = character, kept; black "
                                      "(0) = background, painted white. Note: the MASK of ComfyUI's Load Image is 1 "
                                      "where the PNG is TRANSPARENT, i.e. the background, so put an InvertMask node "
                                      "between Load Image's MASK and this input. One mask for all pictures of the "
                                      "image batch, or one per picture."),
                *extra_views,
            ],
            outputs=[Character.Output(display_name="character", tooltip="The character, for the sampler"),
                     io.Image.Output(display_name="prepared", tooltip="The squares the encoders read (384²), "
                                                                      "one per picture, in the order of weights")],
        )

    @classmethod
    def execute(cls, encoders, image, fit, crop_to_character, margin, weights="", mask=None, image_2=None,
                mask_2=None, image_3=None, mask_3=None, image_4=None, mask_4=None) -> io.NodeOutput:
        import comfy.model_management
        import torch

        views = [("image", image, "mask", mask), ("image_2", image_2, "mask_2", mask_2),
                 ("image_3", image_3, "mask_3", mask_3), ("image_4", image_4, "mask_4", mask_4)]
        squares = reference_squares(views, fit, crop_to_character, margin)
        with encoders_on_device(encoders):
            features = encoders.encode_squares(squares, parse_weights(weights, len(squares)),
                                               cancel_check=comfy.model_management.throw_exception_if_processing_interrupted,
                                               preparation=preparation(fit, crop_to_character, margin))
        prepared = torch.stack([pil_to_tensor(sq.resize((LOW_RES, LOW_RES))) for sq in squares])
        return io.NodeOutput(features.to("cpu"), prepared)


def reference_squares(views, fit, crop, margin) -> list:
    """The squares of every connected (image name, IMAGE, mask name, MASK) in order; each IMAGE may be a batch
    with one mask for all its pictures or one per picture. A mask without its image is refused by name."""
    squares = []
    for image_name, images, mask_name, mask in views:
        if images is None:
            if mask is not None:
                raise InputError(f"{mask_name} is connected but {image_name} is not: connect the picture that mask "
                                 f"belongs to to {image_name}, or disconnect {mask_name}.")
            continue
        try:
            squares += [prepare_reference(p, fit, m, crop, margin) for p, m in split_batch(images, mask)]
        except InputError as err:
            names = image_name if mask is None else f"{image_name} / {mask_name}"
            raise InputError(f"{names}: {err}") from err
    return squares


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
        from ..instantcharacter.reference.character import ReferenceFeatures, plain_features

        a, b = (plain_features(c, "Blend Characters") for c in (character_a, character_b))
        return io.NodeOutput(ReferenceFeatures.blend([a, b], [1 - ratio, ratio]))
