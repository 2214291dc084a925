"""InstantCharacter Apply: the character on ComfyUI's own FLUX MODEL, for the stock KSampler."""

from __future__ import annotations

from comfy_api.latest import io

from .types import CATEGORY, Adapter, Character

WRAPPER_KEY = "instantcharacter"


class ApplyToModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterApply",
            display_name="InstantCharacter Apply (native MODEL)",
            category=CATEGORY,
            description="Adds the character to ComfyUI's own FLUX.1-dev MODEL (from Load Diffusion Model, GGUF or "
                        "fp8 loaders, after LoRA loaders) and returns a patched copy for the stock KSampler. The "
                        "input MODEL is not changed. Two Apply nodes in a row add up.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1-dev MODEL."),
                Adapter.Input("adapter", tooltip="From InstantCharacter Load Adapter."),
                Character.Input("character", tooltip="From InstantCharacter Encode Reference."),
                io.Float.Input("weight", default=0.9, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly the character is imposed (the official subject scale; 0 = off)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the sampling schedule the character starts acting (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where it stops (1 = last step)."),
                io.Boolean.Input("apply_to_negative", default=True,
                                 tooltip="Also apply the character on the negative (uncond) pass when CFG > 1, as the "
                                         "official true-CFG pipeline does. Off makes the character stronger."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched MODEL")],
        )

    @classmethod
    def execute(cls, model, adapter, character, weight, start_percent, end_percent, apply_to_negative) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.patcher_extension

        from ..instantcharacter.run.native import CharacterEntry
        from .native_patch import CharacterBlockPatch

        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}).")
        diffusion = model.get_model_object("diffusion_model")
        if not (hasattr(diffusion, "double_blocks") and hasattr(diffusion, "single_blocks")):
            raise ValueError(f"InstantCharacter Apply needs a FLUX MODEL; this one is a {type(diffusion).__name__}.")
        n_double, n_single = len(diffusion.double_blocks), len(diffusion.single_blocks)
        if n_double + n_single != adapter.num_layers or diffusion.hidden_size != adapter.hidden_size:
            raise ValueError(
                f"The adapter was made for FLUX.1-dev ({adapter.num_layers} layers of {adapter.hidden_size}); this "
                f"MODEL has {n_double}+{n_single} blocks of {diffusion.hidden_size} (not FLUX.1-dev?).")
        sampling = model.get_model_object("model_sampling")
        entry = CharacterEntry(adapter, character, weight, sampling.percent_to_sigma(start_percent),
                               sampling.percent_to_sigma(end_percent), apply_to_negative)

        patched = model.clone()
        existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        shared: dict = {}
        for kind, blocks, offset in (("double", diffusion.double_blocks, 0), ("single", diffusion.single_blocks, n_double)):
            for i, block in enumerate(blocks):
                key = (f"{kind}_block", i)
                before = existing.get(key)
                if isinstance(before, CharacterBlockPatch):
                    patch = before.extended(entry)
                else:
                    patch = CharacterBlockPatch(kind, i, block, offset + i, [entry], before, shared)
                patched.set_model_patch_replace(patch, "dit", f"{kind}_block", i)

        # the adapter's weights live in a ModelPatcher of their own, loaded and offloaded with the model
        adapter_patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=mm.get_torch_device(),
                                                           offload_device=mm.unet_offload_device())
        patched.set_additional_models(f"{WRAPPER_KEY}_{id(entry)}", [adapter_patcher])

        def per_run(executor, *args, **kwargs):
            entry.reset()
            try:
                return executor(*args, **kwargs)
            finally:
                entry.reset()

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, per_run)
        return io.NodeOutput(patched)
