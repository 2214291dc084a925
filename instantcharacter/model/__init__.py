"""The published model as modules: the adapter (projector + one character-attention layer per FLUX attention layer)
and attaching it to a diffusers FLUX transformer, the projector, and the character attention both paths share."""
