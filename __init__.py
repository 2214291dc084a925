"""ComfyUI-InstantCharacter: ComfyUI loads this file; it exports only the V3 entry point.

The nodes are imported when ComfyUI calls the entry point, not when this file is imported, so plain
Python tools (pytest, the command line) can import the package without ComfyUI.
"""

__all__ = ["comfy_entrypoint"]


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as entrypoint

    return await entrypoint()
