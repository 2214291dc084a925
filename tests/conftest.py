import os
from pathlib import Path

import pytest
import torch

# One torch thread per test process unless OMP_NUM_THREADS says otherwise (and, through the environment, per
# process a test starts). The tiny models gain nothing from a second thread, and when every core is busy torch's
# threads wait for each other at every op: a 3-step tiny generation took 0.75 s with one thread and 10-13 s with
# two on a loaded 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
    from instantcharacter.files.encoder_files import load_reference_encoders

    return load_reference_encoders(tiny_models["siglip"], tiny_models["dinov2"], dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_models):
    from instantcharacter.files.adapter_file import load_adapter

    return load_adapter(tiny_models["adapter"], dtype=torch.float32)


@pytest.fixture
def pack_builds(monkeypatch):
    """How many host packs of each kind ("view": the weights re-homed; "copy": an fp8 copy) this test built: the
    packs' constructor, counted (a second build of a kept pack is a re-quantization)."""
    from instantcharacter.run.offload.host_packs import HostPack

    counts = {"view": 0, "copy": 0}
    build = HostPack.__init__

    def counting(self, params, layout, kind):
        counts[kind] += 1
        build(self, params, layout, kind)

    monkeypatch.setattr(HostPack, "__init__", counting)
    return counts


@pytest.fixture(scope="session")
def girl(tiny_encoders):
    """The bundled reference picture encoded by the tiny encoders: the character most tests draw. Tests never change
    it in place (they build new features from it)."""
    from PIL import Image

    return tiny_encoders.encode([Image.open(Path(__file__).resolve().parents[1] / "assets" / "reference_girl.png")])


@pytest.fixture(scope="session")
def girl_latents(tiny_flux, tiny_adapter, girl):
    """The latents of :data:`generation.SMALL_RUN` with ``girl``: what a run that refused bad input and changed
    nothing must still give."""
    from generation import SMALL_RUN, run

    return run(tiny_flux, tiny_adapter, girl, "a girl", **SMALL_RUN).latents
