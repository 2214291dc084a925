"""Style LoRA: a FLUX.1 LoRA from models/loras for the InstantCharacter sampler (pipeline path)."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from . import folders
from .types import CATEGORY, Flux


class StyleLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterStyleLora",
            display_name="InstantCharacter Style LoRA",
            category=CATEGORY,
            description="Adds a FLUX.1 LoRA (a style such as Ghibli or watercolour) to the FLUX model for the "
                        "InstantCharacter sampler. Chain several to stack them, each with its own strength. Nothing "
                        "is merged into the model: the LoRA acts only while the sampler runs, under every offload "
                        "mode, and the loaded FLUX stays unchanged. Reads kohya, ComfyUI, XLabs and diffusers/PEFT "
                        "LoRA files; the text-encoder part of a LoRA, if any, is not used. (On the native path, with "
                        "ComfyUI's MODEL, use ComfyUI's own LoRA loaders instead.)",
            inputs=[
                Flux.Input("flux", tooltip="From InstantCharacter Load FLUX, or another Style LoRA node."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A FLUX.1 (dev) LoRA file in models/loras. SD 1.5/SDXL LoRAs and FLUX "
                                       "Control LoRAs do not fit and give an error."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.01,
                               tooltip="How strongly the LoRA acts: 1 = as trained, 0 = off, negative = the "
                                       "opposite. Lower it if the style overrides the character."),
            ],
            outputs=[Flux.Output(display_name="flux",
                                 tooltip="The same FLUX model carrying this LoRA (and those added before) for the "
                                         "sampler")],
        )

    @classmethod
    def execute(cls, flux, lora_name, strength) -> io.NodeOutput:
        from ..instantcharacter.run.style_loras import StyledFlux

        return io.NodeOutput(StyledFlux.of(flux).with_lora(folders.file_choice("loras", lora_name), strength))
