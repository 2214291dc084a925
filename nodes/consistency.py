"""Consistency Score: how much each generated picture looks like the reference."""

from __future__ import annotations

from comfy_api.latest import io

from ..instantcharacter.reference.images import FIT_MODES
from .devices import encoders_on_device
from .types import CATEGORY, Encoders


class ConsistencyScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterConsistencyScore",
            display_name="InstantCharacter Consistency Score",
            category=CATEGORY,
            description="Embeds the reference and each generated picture with SigLIP and DINOv2 and reports their "
                        "cosine similarity (1 = same picture). Outputs the scores and the best picture of the batch.",
            is_output_node=True,
            inputs=[
                Encoders.Input("encoders", tooltip="From InstantCharacter Load Image Encoders."),
                io.Image.Input("reference", tooltip="The reference picture(s) of the character."),
                io.Image.Input("images", tooltip="The generated pictures to score."),
                io.Combo.Input("fit", options=list(FIT_MODES), default="stretch",
                               tooltip="How pictures are made square before embedding; use the same as Encode "
                                       "Reference."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="Optional mask of the reference (1 = character), as in Encode Reference."),
            ],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True,
                                     tooltip="Mean of the SigLIP and DINOv2 cosine similarity, one per picture"),
                     io.String.Output(display_name="report", tooltip="The scores, readable"),
                     io.Image.Output(display_name="best", tooltip="The picture with the highest score")],
        )

    @classmethod
    def execute(cls, encoders, reference, images, fit, reference_mask=None) -> io.NodeOutput:
        from ..instantcharacter.reference.consistency import consistency_scores
        from ..instantcharacter.reference.images import split_batch, tensor_to_pil

        refs = split_batch(reference, reference_mask)
        generated = [tensor_to_pil(im) for im in images]
        with encoders_on_device(encoders):
            scores = consistency_scores(encoders, [p for p, _ in refs], generated, fit, [m for _, m in refs])
        report = scores.report()
        return io.NodeOutput(scores.combined, report, images[scores.best:scores.best + 1],
                             ui={"text": [report]})
