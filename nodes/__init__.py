"""ComfyUI nodes of the pack. The only code that imports ComfyUI."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import folders
from .loaders import LoadAdapter, LoadFlux, LoadFluxSingleFile, LoadImageEncoders
from .characters import LoadCharacter, SaveCharacter
from .consistency import ConsistencyScore
from .style_lora import StyleLora
from .apply import ApplyToModel
from .reference import BlendCharacters, EncodeReference
from .regions import CharacterRegion, CombineCharacters
from .sampler import Sampler
from .storyboard import ContactSheet, Storyboard, StoryboardPanels

folders.register()

NODES = [LoadFlux, LoadFluxSingleFile, LoadImageEncoders, LoadAdapter, EncodeReference, BlendCharacters,
         CharacterRegion, CombineCharacters, SaveCharacter, LoadCharacter, StyleLora, Sampler, ConsistencyScore,
         ApplyToModel, Storyboard, StoryboardPanels, ContactSheet]


class InstantCharacterExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> InstantCharacterExtension:
    return InstantCharacterExtension()
