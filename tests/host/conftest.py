import importlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui import SKIP_REASON, ComfyServer, comfyui_dir  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def pytest_collection_modifyitems(config, items):
    if comfyui_dir() is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "tests/host" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def write_full_width_flux_vae(path: Path, seed: int = 0) -> Path:
    """A random VAE with the FLUX ae.safetensors architecture at full width (ComfyUI's VAELoader hard-codes
    128 base channels, so this file cannot be tiny: ~84 M parameters, fp16)."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def host_models(tmp_path_factory):
    if comfyui_dir() is None:
        pytest.skip(SKIP_REASON)
    from instantcharacter.testing.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("host_models")
    from instantcharacter.testing.tiny_loras import write_tiny_lora

    write_tiny_models(root)
    write_full_width_flux_vae(root / "vae" / "ae.safetensors")
    write_tiny_lora(root / "loras" / "flux_style_lora.safetensors", "kohya")
    return root


@pytest.fixture(scope="session")
def server(host_models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("comfyui")
    # never reach the real Hugging Face Hub from a test: a closed local port
    with ComfyServer(workdir, host_models, env={"HF_ENDPOINT": "http://127.0.0.1:9"}) as srv:
        for name in ("reference_girl.png", "reference_girl_front.png", "reference_girl_side.png",
                     "reference_girl_wave.png"):
            shutil.copy(ASSETS / name, srv.input_dir / name)
        from PIL import Image

        Image.open(ASSETS / "img2img_scene.png").resize((128, 128)).save(srv.input_dir / "img2img_scene.png")
        yield srv


PACK_PACKAGE = "instantcharacter_pack_native"


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's own modules, imported in-process as ``main.py --cpu`` would (for the in-process host tests)."""
    if comfyui_dir() is None:
        pytest.skip(SKIP_REASON)
    sys.path.insert(0, str(comfyui_dir()))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # as main.py --cpu; must precede comfy.model_management
        import comfy.ldm.flux.model  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.ops  # noqa: F401
        import comfy.sd  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ComfyUI does not import in this Python ({err}); run the host tests with ComfyUI's Python")
    import comfy as module

    return module


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's nodes package (with its block patch and model wrappers), the pack imported as ComfyUI imports a
    custom node (once)."""
    if PACK_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_PACKAGE, ASSETS.parent / "__init__.py",
                                                      submodule_search_locations=[str(ASSETS.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_PACKAGE] = module
        spec.loader.exec_module(module)
    for module in ("block_patch", "model_wrappers"):
        importlib.import_module(f"{PACK_PACKAGE}.nodes.{module}")
    return importlib.import_module(f"{PACK_PACKAGE}.nodes")


@pytest.fixture(scope="session")
def features(tiny_encoders):
    from PIL import Image

    return tiny_encoders.encode([Image.open(ASSETS / "reference_girl.png")])
