"""The InstantCharacter sampler (pipeline path): prompt + character → IMAGE and LATENT."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..instantcharacter.run.offload.planner import OFFLOAD_MODES
from .types import CATEGORY, Adapter, Character, Flux

OOM_HINT = ("Out of GPU memory. Set the sampler's offload to 'budget' with a lower vram_budget_gb (transformer "
            "blocks that do not fit stream from RAM), turn on fp8_storage, or use 'sequential' (one block at a time: "
            "slowest, least memory); lower the size or batch size, and close other GPU programs.")


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterSampler",
            display_name="InstantCharacter Sampler",
            category=CATEGORY,
            description="Generates pictures of the character with FLUX.1-dev and the InstantCharacter adapter. "
                        "Outputs images and the LATENT (FLUX VAE space: ComfyUI's VAEDecode with ae.safetensors "
                        "decodes it). While it runs, the node shows the picture forming, as KSampler does, with "
                        "ComfyUI's live preview setting (none, latent2rgb, or TAESD when taef1 is installed).",
            inputs=[
                Flux.Input("flux", tooltip="From InstantCharacter Load FLUX."),
                Adapter.Input("adapter", tooltip="From InstantCharacter Load Adapter."),
                Character.Input("character", tooltip="From InstantCharacter Encode Reference or Load Character (acts "
                                                     "on the whole picture), or Combine Characters for several "
                                                     "characters, each in its own region."),
                io.String.Input("prompt", multiline=True, default="a character standing in a sunlit forest",
                                tooltip="What to draw. Describe the scene, pose and style; the character comes from "
                                        "the reference."),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16,
                             tooltip="Width in pixels, a multiple of 16. Ignored when a LATENT is connected."),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16,
                             tooltip="Height in pixels, a multiple of 16. Ignored when a LATENT is connected."),
                io.Int.Input("steps", default=28, min=1, max=200,
                             tooltip="Denoising steps (28 is the official setting)."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=20.0, step=0.1,
                               tooltip="FLUX.1-dev's distilled guidance (3.5 is the official setting)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The same seed gives the same pictures on any device."),
                io.Float.Input("subject_scale", default=0.9, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly the character is imposed: 0 = plain FLUX, 0.9 official default; "
                                       "lower it if the prompt's pose or style is ignored."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Pictures per run (different noise)."),
                io.Combo.Input("offload", options=list(OFFLOAD_MODES), default="auto",
                               tooltip="GPU memory use. auto: picks from the free VRAM. off: every model on the GPU "
                                       "(fastest, most VRAM). budget: keep at most vram_budget_gb on the GPU; "
                                       "transformer blocks that do not fit stream from RAM while the GPU works. "
                                       "sequential: one block at a time (slowest, least VRAM). No effect on a "
                                       "CPU-only machine."),
                io.Float.Input("vram_budget_gb", default=16.0, min=2.0, max=200.0, step=0.5,
                               tooltip="Used when offload is 'budget': GiB of VRAM this sampler may use (what nvidia-smi "
                                       "and ComfyUI call GB: a 24 GB card has 24)."),
                io.Boolean.Input("fp8_storage", default=False,
                                 tooltip="Keep the transformer and character-attention weights as fp8 (half the "
                                         "memory and half the bytes to stream) and compute in bf16. Slightly changes "
                                         "the pictures."),
                io.String.Input("negative_prompt", multiline=True, default="", optional=True,
                                tooltip="Optional. Used only when true_cfg > 1 (true classifier-free guidance, about "
                                        "twice as slow)."),
                io.Float.Input("true_cfg", default=1.0, min=1.0, max=10.0, step=0.1, optional=True,
                               tooltip="> 1 with a negative prompt turns on true CFG; 1 = off (official default)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: start from this LATENT (e.g. VAEEncode of a picture with the FLUX "
                                        "VAE) for img2img; its size sets the output size."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="With a LATENT: how much to change it (1 = ignore it, 0.6 keeps the layout). "
                                       "Like KSampler: 'steps' steps run on the tail of a longer schedule."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="The character acts from this fraction of the steps on (0 = from the start; "
                                       "a later start lets the prompt set the layout first)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="... and up to this fraction of the steps (1 = to the end)."),
                io.Float.Input("double_blocks_weight", default=1.0, min=0.0, max=2.0, step=0.05, optional=True,
                               tooltip="Multiplies subject_scale in the 19 double-stream blocks (1 = official)."),
                io.Float.Input("single_blocks_weight", default=1.0, min=0.0, max=2.0, step=0.05, optional=True,
                               tooltip="Multiplies subject_scale in the 38 single-stream blocks (1 = official)."),
                io.Boolean.Input("character_on_negative", default=True, optional=True,
                                 tooltip="With true CFG: also apply the character on the negative pass (the official "
                                         "behaviour). Off makes the character stronger."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, flux, adapter, character, prompt, width, height, steps, guidance, seed, subject_scale,
                batch_size, offload, vram_budget_gb, fp8_storage, negative_prompt="", true_cfg=1.0, latent=None,
                denoise=1.0, start_percent=0.0, end_percent=1.0, double_blocks_weight=1.0, single_blocks_weight=1.0,
                character_on_negative=True) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..instantcharacter.run.pipeline import generate
        from ..instantcharacter.run.settings import GenerationSettings, MemorySettings, RunHooks

        init = None
        if latent is not None:
            init = latent["samples"]
            height, width = init.shape[-2] * 8, init.shape[-1] * 8
            if init.shape[0] > 1 and batch_size == 1:
                batch_size = init.shape[0]
        elif denoise < 1:
            denoise = 1.0  # nothing to keep without an input latent

        # Our models are not ComfyUI ModelPatchers: free what ComfyUI holds before taking the GPU.
        mm.unload_all_models()
        mm.soft_empty_cache()
        bar = comfy.utils.ProgressBar(steps)
        previewer = live_previewer()

        def on_step(step, total, denoised):
            preview = None if denoised is None else previewer.decode_latent_to_preview_image("JPEG", denoised)
            bar.update_absolute(step, total, preview)
            mm.throw_exception_if_processing_interrupted()

        try:
            settings = GenerationSettings(
                prompt, negative_prompt=negative_prompt or None, true_cfg=true_cfg, width=width, height=height,
                steps=steps, guidance=guidance, seed=seed, subject_scale=subject_scale, batch_size=batch_size,
                denoise=denoise, start_percent=start_percent, end_percent=end_percent,
                double_blocks_weight=double_blocks_weight, single_blocks_weight=single_blocks_weight,
                character_on_negative=character_on_negative)
            memory = MemorySettings(offload, vram_budget_gb, fp8_storage, mm.get_torch_device())
            hooks = RunHooks(on_step=on_step, previews=previewer is not None,
                             cancel_check=mm.throw_exception_if_processing_interrupted)
            result = generate(flux, adapter, character, settings, memory, init_latents=init, hooks=hooks)
        except mm.OOM_EXCEPTION as err:
            if mm.OOM_EXCEPTION is Exception:
                raise
            mm.soft_empty_cache()
            raise RuntimeError(OOM_HINT) from err
        streamed = f", {result.bytes_streamed / 2**30:.1f} GiB streamed" if result.bytes_streamed else ""
        logging.info("InstantCharacter Sampler: offload %s%s; VAE decode %s", result.offload, streamed,
                     result.decode or "skipped")
        return io.NodeOutput(result.images, {"samples": result.latents})


def live_previewer():
    """ComfyUI's previewer for FLUX latents under the user's preview setting (--preview-method, or the per-run
    choice of newer ComfyUIs): latent2rgb, TAESD (taef1 in models/vae_approx), or None when previews are off."""
    import comfy.latent_formats
    import comfy.model_management as mm
    import latent_preview

    return latent_preview.get_previewer(mm.get_torch_device(), comfy.latent_formats.Flux())
