"""Storyboard (pipeline path): one character through many panels, the best of k candidates each; and the two small
nodes the native storyboard workflow needs: panel lines as a list, and a contact sheet of a list of pictures."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..instantcharacter.run.offload.planner import OFFLOAD_MODES
from ..instantcharacter.run.storyboard import MAX_CANDIDATES, MAX_PANELS_IN_MEMORY
from .devices import encoders_on_device
from .sampler import OOM_HINT, live_previewer
from .types import CATEGORY, Adapter, Character, Encoders, Flux

log = logging.getLogger(__name__)
EXAMPLE_PANELS = ("# one panel per line; blank lines and lines starting with # are skipped\n"
                  "the girl wakes up in a cosy attic room, morning light\n"
                  "the girl rides her bicycle through a busy market street\n"
                  "the girl reads a letter under a big oak tree\n"
                  "the girl waves goodbye at a train station at dusk")
PANELS_TOOLTIP = ("One panel prompt per line, in story order. Blank lines and lines starting with # are skipped. "
                  f"At most {MAX_PANELS_IN_MEMORY} panels per run.")
STYLE_TOOLTIP = ("Added to every panel line: 'TEXT' is put after each line; 'TEXT {panel} TEXT' puts the line in "
                 "place of {panel}. Empty: the lines as they are.")


class Storyboard(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterStoryboard",
            display_name="InstantCharacter Storyboard",
            category=CATEGORY,
            description="Draws the character through every panel of a story: for each line, 'candidates' pictures "
                        "with seeds derived from the seed and the panel and candidate numbers, each scored by "
                        "consistency with the character's prepared pictures (SigLIP + DINOv2, as Consistency Score), "
                        "the best kept. Outputs the chosen panels in order, a numbered contact sheet, a report of "
                        "every score, and the chosen LATENTs. The models are loaded once for the board; live "
                        "previews and Cancel work as in the Sampler.",
            inputs=[
                Flux.Input("flux", tooltip="From InstantCharacter Load FLUX."),
                Adapter.Input("adapter", tooltip="From InstantCharacter Load Adapter."),
                Character.Input("character", tooltip="From Encode Reference or Load Character (one character, no "
                                                     "region): the candidates are scored against its prepared "
                                                     "pictures."),
                Encoders.Input("encoders", tooltip="From InstantCharacter Load Image Encoders: they score the "
                                                   "candidates."),
                io.String.Input("panels", multiline=True, default=EXAMPLE_PANELS, tooltip=PANELS_TOOLTIP),
                io.String.Input("style", default="", tooltip=STYLE_TOOLTIP),
                io.Int.Input("candidates", default=4, min=1, max=MAX_CANDIDATES,
                             tooltip="Pictures drawn per panel; the one most like the character is kept. Time "
                                     "grows with it: panels × candidates pictures in all."),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16, tooltip="Width in pixels, a multiple "
                                                                                    "of 16."),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16, tooltip="Height in pixels, a multiple "
                                                                                     "of 16."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps (28 is the official "
                                                                          "setting)."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=20.0, step=0.1,
                               tooltip="FLUX.1-dev's distilled guidance (3.5 is the official setting)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The board's seed. Each candidate's own seed (in the report) comes from it and "
                                     "the panel and candidate numbers: the Sampler with that seed draws the same "
                                     "picture."),
                io.Float.Input("subject_scale", default=0.9, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly the character is imposed (0.9 official default)."),
                io.Combo.Input("offload", options=list(OFFLOAD_MODES), default="auto",
                               tooltip="GPU memory use, as in the Sampler: auto, off (everything on the GPU), "
                                       "budget (at most vram_budget_gb; blocks stream from RAM), sequential."),
                io.Float.Input("vram_budget_gb", default=16.0, min=2.0, max=200.0, step=0.5,
                               tooltip="Used when offload is 'budget': GiB of VRAM the board may use."),
                io.Boolean.Input("fp8_storage", default=False,
                                 tooltip="Keep the transformer weights as fp8 (half the memory), compute in bf16. "
                                         "Slightly changes the pictures."),
            ],
            outputs=[io.Image.Output(display_name="panels", tooltip="The chosen picture of each panel, in order"),
                     io.Image.Output(display_name="contact_sheet",
                                     tooltip="The chosen panels in a grid, numbered, with the start of each prompt"),
                     io.String.Output(display_name="report",
                                      tooltip="Per panel: every candidate's score, the winner and its seed"),
                     io.Latent.Output(display_name="latent", tooltip="The chosen panels' LATENTs, in order")],
        )

    @classmethod
    def execute(cls, flux, adapter, character, encoders, panels, style, candidates, width, height, steps, guidance,
                seed, subject_scale, offload, vram_budget_gb, fp8_storage) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..instantcharacter.run.settings import GenerationSettings, MemorySettings, RunHooks
        from ..instantcharacter.reference.images import pil_to_tensor
        from ..instantcharacter.run.storyboard import Board, BoardModels, panel_prompts, storyboard

        settings = GenerationSettings("", width=width, height=height, steps=steps, guidance=guidance,
                                      subject_scale=subject_scale)
        memory = MemorySettings(offload, vram_budget_gb, fp8_storage, mm.get_torch_device())
        board = Board(panel_prompts(panels, style), candidates, seed, settings, memory)
        board.check(MAX_PANELS_IN_MEMORY)  # before ComfyUI's models are moved
        mm.unload_all_models()
        mm.soft_empty_cache()
        bar = comfy.utils.ProgressBar(board.panels * board.steps_per_panel)
        previewer = live_previewer()

        def on_step(done, total, denoised):
            preview = None if denoised is None else previewer.decode_latent_to_preview_image("JPEG", denoised)
            bar.update_absolute(done, total, preview)
            mm.throw_exception_if_processing_interrupted()

        try:
            hooks = RunHooks(on_step=on_step, previews=previewer is not None,
                             cancel_check=mm.throw_exception_if_processing_interrupted)
            result = storyboard(BoardModels(flux, adapter, encoders), board, character, hooks=hooks,
                                scoring=lambda: encoders_on_device(encoders), panel_limit=MAX_PANELS_IN_MEMORY,
                                on_panel=lambda panel: log.info("InstantCharacter Storyboard: %s", panel.summary()))
        except mm.OOM_EXCEPTION as err:
            if mm.OOM_EXCEPTION is Exception:
                raise
            mm.soft_empty_cache()
            raise RuntimeError(OOM_HINT) from err
        report = result.report()
        return io.NodeOutput(result.images, pil_to_tensor(result.contact_sheet())[None], report,
                             {"samples": result.latents}, ui={"text": [report]})


class StoryboardPanels(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterStoryboardPanels",
            display_name="InstantCharacter Storyboard Panels",
            category=CATEGORY,
            description="Turns panel lines into lists for ComfyUI's list execution (the native storyboard): one "
                        "prompt per panel, with the style added, and one seed per panel derived from the seed and "
                        "the panel number. Nodes fed these lists (CLIP Text Encode, KSampler …) run once per panel.",
            inputs=[
                io.String.Input("panels", multiline=True, default=EXAMPLE_PANELS, tooltip=PANELS_TOOLTIP),
                io.String.Input("style", default="", tooltip=STYLE_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The board's seed; each panel's seed comes from it and the panel number."),
            ],
            outputs=[io.String.Output(display_name="prompts", is_output_list=True,
                                      tooltip="One prompt per panel (a list: what it feeds runs once per panel)"),
                     io.Int.Output(display_name="seeds", is_output_list=True,
                                   tooltip="One seed per panel, for KSampler's seed (a list)")],
        )

    @classmethod
    def execute(cls, panels, style, seed) -> io.NodeOutput:
        from ..instantcharacter.run.storyboard import Board, panel_prompts, panel_seed

        prompts = panel_prompts(panels, style)
        Board(prompts, 1, seed).check(MAX_PANELS_IN_MEMORY)
        return io.NodeOutput(prompts, [panel_seed(seed, n) for n in range(1, len(prompts) + 1)])


class ContactSheet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterContactSheet",
            display_name="InstantCharacter Contact Sheet",
            category=CATEGORY,
            is_input_list=True,
            description="Lays pictures out in one numbered grid: every picture of a list (e.g. the best of each panel "
                        "of a native storyboard) or of a batch, in order, each with its number and the start of its "
                        "caption.",
            inputs=[
                io.Image.Input("images", tooltip="The pictures, as a list (one per panel) or a batch."),
                io.Int.Input("columns", default=0, min=0, max=64,
                             tooltip="Pictures per row; 0 picks a near-square grid."),
                io.String.Input("captions", optional=True, force_input=True,
                                tooltip="Optional: one caption per picture (e.g. Storyboard Panels' prompts)."),
            ],
            outputs=[io.Image.Output(display_name="contact_sheet", tooltip="The grid, as one picture")],
        )

    @classmethod
    def execute(cls, images, columns, captions=None) -> io.NodeOutput:
        from ..instantcharacter.reference.images import pil_to_tensor
        from ..instantcharacter.run.contact_sheet import contact_sheet

        pictures = [picture for batch in images for picture in batch]
        sheet = contact_sheet(pictures, list(captions or []), columns=columns[0] or None)
        return io.NodeOutput(pil_to_tensor(sheet)[None])
