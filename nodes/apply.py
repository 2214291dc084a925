"""InstantCharacter Apply: the character on ComfyUI's own FLUX MODEL, for the stock KSampler."""

from __future__ import annotations

from comfy_api.latest import io

from .adapter_patcher import adapter_key, adapter_patcher
from .model_wrappers import WRAPPER_KEY
from .types import CATEGORY, Adapter, Character

class ApplyToModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterApply",
            display_name="InstantCharacter Apply (native MODEL)",
            category=CATEGORY,
            description="Adds the character to ComfyUI's own FLUX.1-dev MODEL (from Load Diffusion Model, GGUF or "
                        "fp8 loaders, after LoRA loaders) and returns a patched copy for the stock KSampler. The "
                        "input MODEL is not changed. Two Apply nodes in a row add up; give each a mask (or give one "
                        "Apply the output of Combine Characters) to put several characters in one picture.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1-dev MODEL."),
                Adapter.Input("adapter", tooltip="From InstantCharacter Load Adapter."),
                Character.Input("character", tooltip="From InstantCharacter Encode Reference or Load Character; or "
                                                     "from Character Region / Combine Characters, whose regions and "
                                                     "strengths it keeps."),
                io.Float.Input("weight", default=0.9, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly the character is imposed (the official subject scale; 0 = off)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the sampling schedule the character starts acting (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where it stops (1 = last step)."),
                io.Boolean.Input("apply_to_negative", default=True,
                                 tooltip="Also apply the character on the negative pass when CFG > 1, as the "
                                         "official true-CFG pipeline does. Off makes the character stronger."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: the part of the picture this character belongs to (white = here; "
                                      "soft edges are kept). Without a mask it acts on the whole picture. Where "
                                      "two characters' masks overlap they share the strength. Leave it empty for "
                                      "a character that has its region from Character Region."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched MODEL")],
        )

    @classmethod
    def execute(cls, model, adapter, character, weight, start_percent, end_percent, apply_to_negative,
                mask=None) -> io.NodeOutput:
        import comfy.patcher_extension as ext

        from ..instantcharacter.errors import InputError
        from ..instantcharacter.run.native_characters import AppliedCharacter, CharacterSet
        from ..instantcharacter.reference.character import characters_in
        from .block_patch import CharacterBlockPatch, check_flux_model
        from .model_wrappers import apply_model_wrapper, diffusion_model_wrapper, outer_sample_wrapper

        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}).")
        diffusion = model.get_model_object("diffusion_model")
        check_flux_model(diffusion, adapter)
        sampling = model.get_model_object("model_sampling")
        members = characters_in(character)
        if mask is not None and any(m.mask is not None for m in members):
            raise InputError("Apply's mask is connected and the character already has a region (from Character "
                             "Region): disconnect one of the two.")
        entries = [AppliedCharacter(adapter, m.features, weight * m.strength, start_percent, end_percent,
                                  apply_to_negative, mask if m.mask is None else m.mask,
                                  sigma_start=sampling.percent_to_sigma(start_percent),
                                  sigma_end=sampling.percent_to_sigma(end_percent)) for m in members]

        patched = model.clone()
        existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        ours = [p for p in existing.values() if isinstance(p, CharacterBlockPatch)]
        characters = ours[0].characters if ours else CharacterSet()
        for entry in entries:
            characters = characters.with_entry(entry)
        n_double = len(diffusion.double_blocks)
        for kind, count, offset in (("double", n_double, 0), ("single", len(diffusion.single_blocks), n_double)):
            for i in range(count):
                before = existing.get((f"{kind}_block", i))
                if isinstance(before, CharacterBlockPatch):  # ours from an earlier Apply: this set replaces it
                    patch = CharacterBlockPatch(kind, i, offset + i, characters, before.previous)
                    patch.stacked = list(before.stacked)
                else:
                    patch = CharacterBlockPatch(kind, i, offset + i, characters, before)
                patched.set_model_patch_replace(patch, "dit", f"{kind}_block", i)

        # the wrappers of an earlier Apply came with the clone: this MODEL's set replaces them
        for kind, make in ((ext.WrappersMP.APPLY_MODEL, apply_model_wrapper),
                           (ext.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper),
                           (ext.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper)):
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
            patched.add_wrapper_with_key(kind, WRAPPER_KEY, make(characters))
        # on the MODEL's own device (after Select Model Device it may not be the main one); ComfyUI copies it to
        # every other device MultiGPU CFG Split adds
        patched.set_additional_models(adapter_key(adapter), [adapter_patcher(adapter, patched.load_device)])
        return io.NodeOutput(patched)
