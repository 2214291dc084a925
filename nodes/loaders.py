"""Loader nodes: FLUX.1-dev (diffusers folder), the two image encoders, and the adapter."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..instantcharacter import hub
from ..instantcharacter.cache import MODELS, file_key
from . import folders
from .types import CATEGORY, DTYPES, Adapter, Encoders, Flux, torch_dtype

FLUX_DOWNLOAD = hub.FLUX_DEV.folder_name + folders.DOWNLOAD_SUFFIX
SIGLIP_DOWNLOAD = hub.SIGLIP.folder_name + folders.DOWNLOAD_SUFFIX
DINO_DOWNLOAD = hub.DINOV2.folder_name + folders.DOWNLOAD_SUFFIX
ADAPTER_DOWNLOAD = hub.ADAPTER_FILENAME + folders.DOWNLOAD_SUFFIX
TOKEN_NOTE = ("Downloads use the token in HF_TOKEN or this machine's Hugging Face login (`hf auth login`); "
              "no token is ever stored in the workflow.")


def _download(model: hub.HubModel, dest: str) -> str:
    bar = comfy.utils.ProgressBar(len(model.patterns))
    return str(hub.download(model, dest, progress=lambda done, total: bar.update_absolute(done, total)))


def _folder_choice(choice: str, options: dict[str, str], model: hub.HubModel, folder_name: str) -> str:
    if choice.endswith(folders.DOWNLOAD_SUFFIX):
        return _download(model, os.path.join(folders.download_target(folder_name), model.folder_name))
    if choice not in options:
        raise FileNotFoundError(f"{choice} is no longer in the {folder_name} folder; refresh the node (press R) "
                                f"and pick another, or choose '{model.folder_name}{folders.DOWNLOAD_SUFFIX}'.")
    return options[choice]


class LoadFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterLoadFlux",
            display_name="InstantCharacter Load FLUX",
            category=CATEGORY,
            description="Loads FLUX.1-dev in diffusers format (transformer, T5 and CLIP text encoders, VAE) for the "
                        "InstantCharacter sampler. The model stays cached between runs.",
            inputs=[
                io.Combo.Input("model", options=sorted(folders.subfolders("diffusion_models")) + [FLUX_DOWNLOAD],
                               tooltip="A diffusers FLUX.1-dev folder (with model_index.json) inside models/unet or "
                                       f"models/diffusion_models, or '{FLUX_DOWNLOAD}' to fetch the diffusers files "
                                       "(33.7 GB, gated: accept the licence on huggingface.co first) into "
                                       f"models/unet/FLUX.1-dev. {TOKEN_NOTE}"),
                io.Combo.Input("weight_dtype", options=["bf16", "fp16"], default="bf16",
                               tooltip="Precision of the weights: bf16 (what FLUX was trained in) or fp16."),
            ],
            outputs=[Flux.Output(display_name="flux",
                                                                tooltip="FLUX.1-dev for the InstantCharacter sampler")],
        )

    @classmethod
    def execute(cls, model, weight_dtype) -> io.NodeOutput:
        from ..instantcharacter.pipeline import load_flux

        path = _folder_choice(model, folders.subfolders("diffusion_models"), hub.FLUX_DEV, "diffusion_models")
        dtype = torch_dtype(weight_dtype)
        flux = MODELS.get("flux", file_key(path, weight_dtype), lambda: load_flux(path, dtype))
        return io.NodeOutput(flux)


ENCODER_TYPES = {"siglip": ("siglip", "siglip_vision_model"), "dinov2": ("dinov2",)}


class LoadImageEncoders(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterLoadImageEncoders",
            display_name="InstantCharacter Load Image Encoders",
            category=CATEGORY,
            description="Loads the two vision encoders InstantCharacter reads the reference with: SigLIP "
                        "so400m-patch14-384 and DINOv2-giant (Hugging Face folders in models/clip_vision).",
            inputs=[
                io.Combo.Input("siglip", options=sorted(folders.subfolders("clip_vision", ENCODER_TYPES["siglip"]))
                               + [SIGLIP_DOWNLOAD],
                               tooltip="Folder of google/siglip-so400m-patch14-384 in models/clip_vision (config.json, "
                                       f"model.safetensors, preprocessor_config.json), or '{SIGLIP_DOWNLOAD}' (3.5 GB). "
                                       + TOKEN_NOTE),
                io.Combo.Input("dinov2", options=sorted(folders.subfolders("clip_vision", ENCODER_TYPES["dinov2"]))
                               + [DINO_DOWNLOAD],
                               tooltip="Folder of facebook/dinov2-giant in models/clip_vision, or "
                                       f"'{DINO_DOWNLOAD}' (4.5 GB). " + TOKEN_NOTE),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Precision of the encoders; bf16 matches the official pipeline on GPU."),
            ],
            outputs=[Encoders.Output(display_name="encoders", tooltip="SigLIP + DINOv2 for Encode Reference")],
        )

    @classmethod
    def execute(cls, siglip, dinov2, weight_dtype) -> io.NodeOutput:
        from ..instantcharacter.encoders import ReferenceEncoders

        siglip_path = _folder_choice(siglip, folders.subfolders("clip_vision", ENCODER_TYPES["siglip"]),
                                     hub.SIGLIP, "clip_vision")
        dino_path = _folder_choice(dinov2, folders.subfolders("clip_vision", ENCODER_TYPES["dinov2"]),
                                   hub.DINOV2, "clip_vision")
        dtype = torch_dtype(weight_dtype)
        key = file_key(siglip_path) + file_key(dino_path) + (weight_dtype,)
        encoders = MODELS.get("encoders", key, lambda: ReferenceEncoders.load(siglip_path, dino_path, dtype=dtype))
        return io.NodeOutput(encoders)


class LoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = [f for f in folder_paths.get_filename_list(folders.IPADAPTER)]
        return io.Schema(
            node_id="InstantCharacterLoadAdapter",
            display_name="InstantCharacter Load Adapter",
            category=CATEGORY,
            description="Loads the InstantCharacter adapter (projector + character attention for the 57 FLUX "
                        "attention layers) from models/ipadapter. Other IP-Adapters are refused with a message "
                        "saying what the file is.",
            inputs=[
                io.Combo.Input("adapter", options=files + [ADAPTER_DOWNLOAD],
                               tooltip="instantcharacter_ip-adapter.bin (or the same tensors as .safetensors) in "
                                       f"models/ipadapter, or '{ADAPTER_DOWNLOAD}' (5.6 GB from Tencent/InstantCharacter). "
                                       + TOKEN_NOTE),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Precision of the adapter; use the same as Load FLUX."),
            ],
            outputs=[Adapter.Output(display_name="adapter", tooltip="The InstantCharacter adapter")],
        )

    @classmethod
    def execute(cls, adapter, weight_dtype) -> io.NodeOutput:
        from ..instantcharacter.adapter import load_adapter

        if adapter.endswith(folders.DOWNLOAD_SUFFIX):
            path = _download(hub.ADAPTER, folders.download_target(folders.IPADAPTER))
        else:
            path = folder_paths.get_full_path(folders.IPADAPTER, adapter)
            if path is None:
                raise FileNotFoundError(f"{adapter} is not in models/ipadapter any more; refresh (press R) and pick "
                                        f"another, or choose '{ADAPTER_DOWNLOAD}'.")
        dtype = torch_dtype(weight_dtype)
        model = MODELS.get("adapter", file_key(path, weight_dtype), lambda: load_adapter(path, dtype=dtype))
        return io.NodeOutput(model)
