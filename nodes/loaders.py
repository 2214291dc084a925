"""Loader nodes: FLUX.1-dev (a diffusers folder, or ComfyUI's single files), the two image encoders, and the
adapter."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..instantcharacter.files import hub
from ..instantcharacter.files.cache import MODELS, file_key
from . import folders
from .types import CATEGORY, DTYPES, Adapter, Encoders, Flux, torch_dtype

FLUX_DOWNLOAD = hub.FLUX_DEV.folder_name + folders.DOWNLOAD_SUFFIX
SIGLIP_DOWNLOAD = hub.SIGLIP.folder_name + folders.DOWNLOAD_SUFFIX
DINO_DOWNLOAD = hub.DINOV2.folder_name + folders.DOWNLOAD_SUFFIX
ADAPTER_DOWNLOAD = hub.ADAPTER_FILENAME + folders.DOWNLOAD_SUFFIX
TOKEN_NOTE = ("Downloads use the token in HF_TOKEN or this machine's Hugging Face login (`hf auth login`); "
              "no token is ever stored in the workflow.")


class LoadFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterLoadFlux",
            display_name="InstantCharacter Load FLUX",
            category=CATEGORY,
            description="Loads FLUX.1-dev in diffusers format (transformer, T5 and CLIP text encoders, VAE) for the "
                        "InstantCharacter sampler. The model stays cached between runs. Already have ComfyUI's "
                        "flux1-dev.safetensors, clip_l, t5xxl and ae files? Use 'InstantCharacter Load FLUX (single "
                        "files)' instead: no download.",
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
        from ..instantcharacter.files.flux import load_flux
        from ..instantcharacter.run.style_loras import StyledFlux

        path = folders.folder_choice(model, folders.subfolders("diffusion_models"), hub.FLUX_DEV, "diffusion_models")
        dtype = torch_dtype(weight_dtype)
        flux = MODELS.get("flux", file_key(path, weight_dtype), lambda: load_flux(path, dtype))
        return io.NodeOutput(StyledFlux(flux))


FP8_STORAGE = {"auto": None, "on": True, "off": False}


class LoadFluxSingleFile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        transformers = folders.model_files("diffusion_models")
        encoders = folders.model_files("text_encoders")
        vaes = folders.model_files("vae")
        return io.Schema(
            node_id="InstantCharacterLoadFluxSingleFile",
            display_name="InstantCharacter Load FLUX (single files)",
            category=CATEGORY,
            description="Builds FLUX.1-dev for the InstantCharacter sampler from the files ComfyUI users already "
                        "have: the transformer (flux1-dev.safetensors, bf16 or fp8), clip_l, t5xxl (fp16 or fp8) "
                        "and ae.safetensors. Nothing is downloaded: the configs ship with the pack and the "
                        "tokenizers come from ComfyUI. A file that is not what its input expects (FLUX.1-schnell, "
                        "SD3, the wrong text encoder, an SDXL VAE...) is refused with a message saying what it is. "
                        "The model stays cached between runs.",
            inputs=[
                io.Combo.Input("transformer", options=transformers,
                               default=folders.likely(transformers, "flux1-dev", "flux1_dev", "flux-dev", "flux"),
                               tooltip="The FLUX.1-dev transformer file in models/diffusion_models (models/unet): "
                                       "flux1-dev.safetensors or an fp8 version (flux1-dev-fp8*.safetensors). "
                                       "FLUX.1-schnell, Fill, Depth and Canny do not work with InstantCharacter."),
                io.Combo.Input("clip_l", options=encoders, default=folders.likely(encoders, "clip_l", "clip-l"),
                               tooltip="The CLIP-L text encoder in models/text_encoders (models/clip): "
                                       "clip_l.safetensors."),
                io.Combo.Input("t5", options=encoders, default=folders.likely(encoders, "t5xxl", "t5"),
                               tooltip="The T5-XXL text encoder in models/text_encoders (models/clip): "
                                       "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (both work)."),
                io.Combo.Input("vae", options=vaes, default=folders.likely(vaes, "ae.", "flux"),
                               tooltip="The FLUX.1 VAE in models/vae: ae.safetensors."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Precision the model computes in: bf16 (what FLUX was trained in), fp16, or "
                                       "fp32 (CPU tests)."),
                io.Combo.Input("fp8_storage", options=list(FP8_STORAGE), default="auto",
                               tooltip="Keep the transformer's and T5's big weights as fp8 in memory (half of bf16; "
                                       "they compute in weight_dtype). auto: only for files that are fp8, so an "
                                       "fp8 checkpoint never grows to a 24 GB bf16 copy. on: also convert bf16/fp16 "
                                       "files to fp8 while loading, tensor by tensor. off: convert fp8 files to "
                                       "weight_dtype."),
            ],
            outputs=[Flux.Output(display_name="flux", tooltip="FLUX.1-dev for the InstantCharacter sampler")],
        )

    @classmethod
    def execute(cls, transformer, clip_l, t5, vae, weight_dtype, fp8_storage) -> io.NodeOutput:
        from ..instantcharacter.files.flux import assemble_flux
        from ..instantcharacter.run.style_loras import StyledFlux

        paths = [folders.file_choice("diffusion_models", transformer), folders.file_choice("text_encoders", clip_l),
                 folders.file_choice("text_encoders", t5), folders.file_choice("vae", vae)]
        clip_tokenizer, t5_tokenizer = folders.comfy_tokenizer_dirs()
        dtype = torch_dtype(weight_dtype)
        key = tuple(part for p in paths for part in file_key(p)) + (weight_dtype, fp8_storage)
        flux = MODELS.get("flux", key, lambda: assemble_flux(*paths, clip_tokenizer, t5_tokenizer, dtype,
                                                              FP8_STORAGE[fp8_storage]))
        return io.NodeOutput(StyledFlux(flux))


ENCODER_TYPES = {"siglip": ("siglip", "siglip_vision_model"), "dinov2": ("dinov2",)}


class LoadImageEncoders(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstantCharacterLoadImageEncoders",
            display_name="InstantCharacter Load Image Encoders",
            category=CATEGORY,
            description="Loads the two vision encoders InstantCharacter reads the reference with: SigLIP "
                        "so400m-patch14-384 and DINOv2-giant (Hugging Face folders in models/clip_vision; SigLIP "
                        "also as the single file FLUX Redux uses, sigclip_vision_patch14_384.safetensors).",
            inputs=[
                io.Combo.Input("siglip", options=sorted(folders.subfolders("clip_vision", ENCODER_TYPES["siglip"]))
                               + folders.model_files("clip_vision") + [SIGLIP_DOWNLOAD],
                               tooltip="Folder of google/siglip-so400m-patch14-384 in models/clip_vision (config.json, "
                                       "model.safetensors, preprocessor_config.json), or the single file FLUX Redux "
                                       "uses (sigclip_vision_patch14_384.safetensors; other files, e.g. CLIP vision "
                                       f"or SigLIP 2, are refused with a message), or '{SIGLIP_DOWNLOAD}' (3.5 GB). "
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
        from ..instantcharacter.files.encoder_files import load_reference_encoders

        siglip_folders = folders.subfolders("clip_vision", ENCODER_TYPES["siglip"])
        if siglip in siglip_folders or siglip.endswith(folders.DOWNLOAD_SUFFIX):
            siglip_path = folders.folder_choice(siglip, siglip_folders, hub.SIGLIP, "clip_vision")
        else:
            siglip_path = folders.file_choice("clip_vision", siglip)
        dino_path = folders.folder_choice(dinov2, folders.subfolders("clip_vision", ENCODER_TYPES["dinov2"]),
                                   hub.DINOV2, "clip_vision")
        dtype = torch_dtype(weight_dtype)
        key = file_key(siglip_path) + file_key(dino_path) + (weight_dtype,)
        encoders = MODELS.get("encoders", key, lambda: load_reference_encoders(siglip_path, dino_path, dtype=dtype))
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
        from ..instantcharacter.files.adapter_file import load_adapter

        if adapter.endswith(folders.DOWNLOAD_SUFFIX):
            path = folders.download(hub.ADAPTER, folders.download_target(folders.IPADAPTER))
        else:
            path = folders.file_choice(folders.IPADAPTER, adapter, ADAPTER_DOWNLOAD)
        dtype = torch_dtype(weight_dtype)
        model = MODELS.get("adapter", file_key(path, weight_dtype), lambda: load_adapter(path, dtype=dtype))
        return io.NodeOutput(model)
