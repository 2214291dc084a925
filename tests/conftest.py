import pytest
import torch


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models in the real on-disk layouts, in a ComfyUI-like models tree."""
    from instantcharacter.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_flux(tiny_models):
    from instantcharacter.files.flux import load_flux

    return load_flux(tiny_models["flux"], dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_encoders(tiny_models):
    from instantcharacter.files.encoders import load_reference_encoders

    return load_reference_encoders(tiny_models["siglip"], tiny_models["dinov2"], dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_models):
    from instantcharacter.files.adapter_file import load_adapter

    return load_adapter(tiny_models["adapter"], dtype=torch.float32)
