"""InstantCharacter for FLUX.1-dev: the model core shared by the ComfyUI nodes and the command line.

Importing this package is cheap: torch-heavy modules (diffusers, transformers) load only when used.
"""

__version__ = "0.1.0"
