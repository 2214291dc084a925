"""The pack's own socket types (saved in workflows: never rename them)."""

from comfy_api.latest import io

Flux = io.Custom("INSTANTCHARACTER_FLUX")
Encoders = io.Custom("INSTANTCHARACTER_ENCODERS")
Adapter = io.Custom("INSTANTCHARACTER_ADAPTER")
Character = io.Custom("INSTANTCHARACTER_CHARACTER")

CATEGORY = "InstantCharacter"
DTYPES = ("bf16", "fp16", "fp32")


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
