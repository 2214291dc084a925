"""Loader nodes: FLUX.1-dev (a diffusers folder, or ComfyUI's single files), the two image encoders, and the
adapter."""

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


def _model_files(folder_name: str) -> list[str]:
    """Single model files in a ComfyUI model folder, without the files inside diffusers/transformers model
    folders (those are offered as folders)."""
    roots = [r for r in folder_paths.get_folder_paths(folder_name) if os.path.isdir(r)]
    seen: dict[str, bool] = {}

    def is_model_folder(rel: str) -> bool:
        if rel not in seen:
            seen[rel] = any(os.path.isfile(os.path.join(root, rel, marker))
                            for root in roots for marker in ("config.json", "model_index.json"))
        return seen[rel]

    def inside_model_folder(name: str) -> bool:
        parent = os.path.dirname(name)
        while parent:
            if is_model_folder(parent):
                return True
            parent = os.path.dirname(parent)
        return False

    return [f for f in folder_paths.get_filename_list(folder_name) if not inside_model_folder(f)]


def _likely(options: list[str], *hints: str) -> str | None:
    """The first option whose file name starts with one of ``hints`` (in order), to preselect the usual file."""
    for hint in hints:
        for option in options:
            if os.path.basename(option).lower().startswith(hint):
                return option
    return None


def _file_choice(folder_name: str, name: str) -> str:
    path = folder_paths.get_full_path(folder_name, name)
    if path is None:
        raise FileNotFoundError(f"{name} is not in the {folder_name} folder any more; refresh the node (press R) "
                                "and pick another.")
    return path


def _comfy_tokenizer_dirs() -> tuple[str, str]:
    """The CLIP and T5 tokenizer folders that ship with the running ComfyUI."""
    import comfy

    base = os.path.realpath(next(iter(comfy.__path__)))  # a namespace package: no comfy.__file__
    return os.path.join(base, "sd1_tokenizer"), os.path.join(base, "text_encoders", "t5_tokenizer")


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
        from ..instantcharacter.pipeline import load_flux

        path = _folder_choice(model, folders.subfolders("diffusion_models"), hub.FLUX_DEV, "diffusion_models")
        dtype = torch_dtype(weight_dtype)
        flux = MODELS.get("flux", file_key(path, weight_dtype), lambda: load_flux(path, dtype))
        return io.NodeOutput(flux)


FP8_STORAGE = {"auto": None, "on": True, "off": False}


class LoadFluxSingleFile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        transformers = _model_files("diffusion_models")
        encoders = _model_files("text_encoders")
        vaes = _model_files("vae")
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
                               default=_likely(transformers, "flux1-dev", "flux1_dev", "flux-dev", "flux"),
                               tooltip="The FLUX.1-dev transformer file in models/diffusion_models (models/unet): "
                                       "flux1-dev.safetensors or an fp8 version (flux1-dev-fp8*.safetensors). "
                                       "FLUX.1-schnell, Fill, Depth and Canny do not work with InstantCharacter."),
                io.Combo.Input("clip_l", options=encoders, default=_likely(encoders, "clip_l", "clip-l"),
                               tooltip="The CLIP-L text encoder in models/text_encoders (models/clip): "
                                       "clip_l.safetensors."),
                io.Combo.Input("t5", options=encoders, default=_likely(encoders, "t5xxl", "t5"),
                               tooltip="The T5-XXL text encoder in models/text_encoders (models/clip): "
                                       "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (both work)."),
                io.Combo.Input("vae", options=vaes, default=_likely(vaes, "ae.", "flux"),
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
        from ..instantcharacter.single_file import assemble_flux

        paths = [_file_choice("diffusion_models", transformer), _file_choice("text_encoders", clip_l),
                 _file_choice("text_encoders", t5), _file_choice("vae", vae)]
        clip_tokenizer, t5_tokenizer = _comfy_tokenizer_dirs()
        dtype = torch_dtype(weight_dtype)
        key = tuple(part for p in paths for part in file_key(p)) + (weight_dtype, fp8_storage)
        flux = MODELS.get("flux", key, lambda: assemble_flux(*paths, clip_tokenizer, t5_tokenizer, dtype,
                                                              FP8_STORAGE[fp8_storage]))
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
                        "so400m-patch14-384 and DINOv2-giant (Hugging Face folders in models/clip_vision; SigLIP "
                        "also as the single file FLUX Redux uses, sigclip_vision_patch14_384.safetensors).",
            inputs=[
                io.Combo.Input("siglip", options=sorted(folders.subfolders("clip_vision", ENCODER_TYPES["siglip"]))
                               + _model_files("clip_vision") + [SIGLIP_DOWNLOAD],
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
        from ..instantcharacter.single_file import load_reference_encoders

        siglip_folders = folders.subfolders("clip_vision", ENCODER_TYPES["siglip"])
        if siglip in siglip_folders or siglip.endswith(folders.DOWNLOAD_SUFFIX):
            siglip_path = _folder_choice(siglip, siglip_folders, hub.SIGLIP, "clip_vision")
        else:
            siglip_path = _file_choice("clip_vision", siglip)
        dino_path = _folder_choice(dinov2, folders.subfolders("clip_vision", ENCODER_TYPES["dinov2"]),
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
