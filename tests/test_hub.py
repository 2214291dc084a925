"""Downloads, tested against a local stand-in for the Hugging Face Hub (tests/hub_standin.py), never the real Hub.

Every test runs with the Hugging Face cache and token file in tmp_path, no token in the environment, telemetry
off, and an HTTP guard on huggingface_hub's shared client that fails the test on any request to a host other
than the stand-in's (127.0.0.1 / localhost).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from pathlib import Path

import pytest

from hub_standin import HubStandin, unreachable_endpoint
from instantcharacter.files import hub
from instantcharacter.errors import DownloadError

FLUX = hub.FLUX_DEV.repo_id
SIGLIP = hub.SIGLIP.repo_id
DINOV2 = hub.DINOV2.repo_id
ADAPTER = hub.ADAPTER.repo_id
TOKEN = "hf_standin_test_token"
SHARD = "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"
ALLOWED_HOSTS = {"127.0.0.1", "localhost"}


class ForeignRequestError(AssertionError):
    """huggingface_hub tried to reach a host other than the local stand-in."""


# ---- isolation ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_hf(tmp_path, monkeypatch):
    """Keep huggingface_hub's cache, token and settings in tmp_path and refuse requests to any other host.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_TOKEN_PATH / HF_HUB_DISABLE_TELEMETRY once, into
    ``huggingface_hub.constants``, when it is imported, so the environment variables alone do not reach an
    already imported library: the constants are patched too. ``HF_TOKEN`` is different: ``get_token()`` reads
    ``os.environ`` on every request, so tests set it with ``monkeypatch.setenv``.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    home = tmp_path / "hf_home"
    env = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_TOKEN_PATH": home / "token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    patched = {
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for name, value in patched.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    foreign: list[str] = []

    def guard(request):
        if request.url.host not in ALLOWED_HOSTS:
            foreign.append(str(request.url))
            raise ForeignRequestError(f"a test tried to reach {request.url}; only the local stand-in is allowed")

    def guarded_client():
        client = _http.default_client_factory()
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks.get("request", []), guard]}
        return client

    huggingface_hub.set_client_factory(guarded_client)  # also closes the shared session made before
    yield foreign
    huggingface_hub.set_client_factory(_http.default_client_factory)
    assert not foreign, f"requests left the stand-in: {foreign}"


class _NoWaitClock:
    """Stands in for the ``time`` module inside huggingface_hub's retry loop: every wait between retries is
    recorded and returns at once (the retries still happen; the tests need not sit through 23 s of backoff)."""

    def __init__(self):
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture(autouse=True)
def retry_waits(monkeypatch) -> list[float]:
    """The waits huggingface_hub's retries asked for, in order (none is waited)."""
    from huggingface_hub.utils import _http

    clock = _NoWaitClock()
    monkeypatch.setattr(_http, "time", clock)
    return clock.waits


# ---- tiny repos in the real layouts ---------------------------------------------------------------------------


def _bytes(name: str, size: int = 2048) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _index(shards: list[str]) -> bytes:
    weight_map = {f"layer{i}.weight": shard for i, shard in enumerate(shards)}
    return json.dumps({"metadata": {"total_size": 2048 * len(shards)}, "weight_map": weight_map}).encode()


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FLUX_EXCLUDED = ("flux1-dev.safetensors", "ae.safetensors", "README.md", "LICENSE.md", ".gitattributes",
                 "dev_grid.jpg")


def flux_files() -> dict[str, bytes]:
    te2 = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    tr = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    files = {
        "model_index.json": b'{"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0"}',
        "scheduler/scheduler_config.json": b'{"_class_name": "FlowMatchEulerDiscreteScheduler"}',
        "text_encoder/config.json": b'{"architectures": ["CLIPTextModel"]}',
        "text_encoder/model.safetensors": _bytes("te"),
        "text_encoder_2/config.json": b'{"architectures": ["T5EncoderModel"]}',
        "text_encoder_2/model.safetensors.index.json": _index(te2),
        "tokenizer/merges.txt": b"#version: 0.2\n",
        "tokenizer/special_tokens_map.json": b"{}",
        "tokenizer/tokenizer_config.json": b"{}",
        "tokenizer/vocab.json": b'{"a": 0}',
        "tokenizer_2/special_tokens_map.json": b"{}",
        "tokenizer_2/spiece.model": _bytes("spiece", 512),
        "tokenizer_2/tokenizer.json": b"{}",
        "tokenizer_2/tokenizer_config.json": b"{}",
        "transformer/config.json": b'{"_class_name": "FluxTransformer2DModel"}',
        "transformer/diffusion_pytorch_model.safetensors.index.json": _index(tr),
        "vae/config.json": b'{"_class_name": "AutoencoderKL"}',
        "vae/diffusion_pytorch_model.safetensors": _bytes("vae"),
    }
    files.update({f"text_encoder_2/{s}": _bytes(s) for s in te2})
    files.update({f"transformer/{s}": _bytes(s) for s in tr})
    # Root files of the real repo that the diffusers layout does not need: never to be downloaded.
    files.update({"flux1-dev.safetensors": _bytes("flux1-dev", 256 * 1024), "ae.safetensors": _bytes("ae", 64 * 1024),
                  "README.md": b"# FLUX.1 [dev]\n", "LICENSE.md": b"licence\n",
                  ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                  "dev_grid.jpg": _bytes("grid")})
    return files


def encoder_files(name: str) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "%s"}' % name.encode(), "model.safetensors": _bytes(name),
            "preprocessor_config.json": b"{}", "README.md": b"# encoder\n", "pytorch_model.bin": _bytes(name + "pt"),
            "tokenizer.json": b"{}", "spiece.model": _bytes(name + "sp", 512)}


def adapter_files(size: int = 4096) -> dict[str, bytes]:
    return {hub.ADAPTER_FILENAME: _bytes("adapter", size), "README.md": b"# InstantCharacter\n",
            "assets/demo.png": _bytes("demo")}


@pytest.fixture
def repos(tmp_path) -> dict[str, Path]:
    served = tmp_path / "served"
    return {FLUX: _write(served / "flux", flux_files()), SIGLIP: _write(served / "siglip", encoder_files("siglip")),
            DINOV2: _write(served / "dinov2", encoder_files("dinov2")), ADAPTER: _write(served / "adapter", adapter_files())}


def wanted(model: hub.HubModel, folder: Path) -> set[str]:
    """The files of the served folder that ``model.patterns`` select (what a download must fetch)."""
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return {f for f in files if any(fnmatch.fnmatch(f, pat) for pat in model.patterns)}


def local_files(dest: Path) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*")
            if p.is_file() and not p.relative_to(dest).as_posix().startswith(".cache/")}


def same_bytes(served: Path, dest: Path, files: set[str]) -> bool:
    return all((served / f).read_bytes() == (dest / f).read_bytes() for f in files)


# ---- tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [hub.FLUX_DEV, hub.SIGLIP, hub.DINOV2, hub.ADAPTER], ids=lambda m: m.repo_id)
def test_download_gives_complete_folder_and_skips_unneeded_files(model, repos, tmp_path):
    dest = tmp_path / "models" / (model.folder_name or "ipadapter")
    with HubStandin(repos) as hubstand:
        result = hub.download(model, dest, endpoint=hubstand.endpoint)
        requested = hubstand.files_requested(model.repo_id)
        assert not hubstand.unhandled, hubstand.unhandled
    need = wanted(model, repos[model.repo_id])
    assert need and requested == need  # nothing outside allow_patterns was even asked about
    assert local_files(dest) == need and same_bytes(repos[model.repo_id], dest, need)
    if model is hub.FLUX_DEV:
        assert result == dest and hub.missing_flux_files(dest) == []
        for name in FLUX_EXCLUDED:
            assert not (dest / name).exists()
        assert "flux1-dev.safetensors" not in requested and "ae.safetensors" not in requested
    elif model is hub.ADAPTER:
        assert result == dest / hub.ADAPTER_FILENAME and result.is_file()
    else:
        assert result == dest and hub.missing_encoder_files(dest) == []


def test_missing_shard_is_reported_and_next_download_restores_only_it(repos, tmp_path):
    dest = tmp_path / "FLUX.1-dev"
    with HubStandin(repos) as hubstand:
        hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint)
        (dest / SHARD).unlink()
        assert hub.missing_flux_files(dest) == [SHARD]
        hubstand.clear_log()
        assert hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint) == dest
        assert hubstand.files_downloaded(FLUX) == [SHARD]
    assert hub.missing_flux_files(dest) == []
    assert (dest / SHARD).read_bytes() == (repos[FLUX] / SHARD).read_bytes()


def test_missing_flux_files_lists_unreadable_index_and_missing_config(tmp_path):
    dest = _write(tmp_path / "flux", {k: v for k, v in flux_files().items() if k not in FLUX_EXCLUDED})
    assert hub.missing_flux_files(dest) == []
    (dest / "vae/config.json").unlink()
    (dest / "text_encoder_2/model.safetensors.index.json").write_text("{not json")
    assert hub.missing_flux_files(dest) == ["vae/config.json", "text_encoder_2/model.safetensors.index.json (unreadable)"]


def test_gated_repo_without_token_says_accept_licence_and_set_hf_token(repos, tmp_path):
    dest = tmp_path / "FLUX.1-dev"
    with HubStandin(repos, gated={FLUX}, token=TOKEN) as hubstand:
        with pytest.raises(DownloadError) as info:
            hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint)
        assert hubstand.files_downloaded(FLUX) == []
        assert {r.status for r in hubstand.log(kind="resolve")} == {401}
    message = str(info.value)
    assert "gated" in message and "accept its licence" in message
    assert "HF_TOKEN" in message and "hf auth login" in message
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message and str(dest) in message
    assert local_files(dest) == set()


def test_gated_repo_with_wrong_token_gives_the_same_advice(repos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    with HubStandin(repos, gated={FLUX}, token=TOKEN) as hubstand:
        with pytest.raises(DownloadError, match="accept its licence.*HF_TOKEN"):
            hub.download(hub.FLUX_DEV, tmp_path / "FLUX.1-dev", endpoint=hubstand.endpoint)
        assert {r.status for r in hubstand.log(kind="resolve")} == {403}


def test_gated_repo_downloads_with_hf_token_from_environment(repos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    dest = tmp_path / "FLUX.1-dev"
    with HubStandin(repos, gated={FLUX}, token=TOKEN) as hubstand:
        assert hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint) == dest
        resolves, cdn = hubstand.log(kind="resolve"), hubstand.log(kind="cdn")
    assert hub.missing_flux_files(dest) == []
    assert resolves and all(r.authorization == f"Bearer {TOKEN}" for r in resolves)
    assert cdn and all(r.authorization is None for r in cdn)  # the token never goes to the "CDN"


def test_unknown_repo_says_it_could_not_be_opened(repos, tmp_path):
    with HubStandin({}) as hubstand:
        with pytest.raises(DownloadError) as info:
            hub.download(hub.SIGLIP, tmp_path / "siglip", endpoint=hubstand.endpoint)
        with pytest.raises(DownloadError) as gated_info:
            hub.download(hub.FLUX_DEV, tmp_path / "FLUX.1-dev", endpoint=hubstand.endpoint)
    assert "google/siglip-so400m-patch14-384 could not be opened (HTTP 401)" in str(info.value)
    assert "by hand" in str(info.value) and "gated" not in str(info.value)
    assert "gated and needs a token" in str(gated_info.value) and "HF_TOKEN" in str(gated_info.value)


@pytest.mark.parametrize("model", [hub.FLUX_DEV, hub.SIGLIP, hub.ADAPTER], ids=lambda m: m.repo_id)
def test_unreachable_hub_says_check_connection_or_place_files_by_hand(model, tmp_path):
    dest = tmp_path / "models" / (model.folder_name or "ipadapter")
    with unreachable_endpoint() as endpoint:
        with pytest.raises(DownloadError) as info:
            hub.download(model, dest, endpoint=endpoint)
    message = str(info.value)
    assert "internet connection" in message and "by hand" in message
    assert f"https://huggingface.co/{model.repo_id}" in message and str(dest) in message


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_each_retry_is_one_line_of_ours_and_reaches_the_console_once(tmp_path, retry_waits):
    """huggingface_hub logs two warnings per retry, through its own handler and through the application's: while
    our download runs, both are replaced by one record of ours, which only the application's handlers print."""
    hf_console, app_console = _Records(), _Records()
    logging.getLogger("huggingface_hub").addHandler(hf_console)
    logging.getLogger().addHandler(app_console)
    try:
        with unreachable_endpoint() as endpoint, pytest.raises(DownloadError, match="internet connection"):
            hub.download(hub.SIGLIP, tmp_path / "siglip", endpoint=endpoint)
    finally:
        logging.getLogger("huggingface_hub").removeHandler(hf_console)
        logging.getLogger().removeHandler(app_console)
    assert retry_waits == [1, 2, 4, 8, 8]  # huggingface_hub's own backoff, five retries
    assert not [m for m in hf_console.messages if "thrown while requesting" in m or "Retry" in m], hf_console.messages
    retries = [m for m in app_console.messages if m.startswith("Hub request failed")]
    assert len(retries) == 5 and len(set(retries)) == 5, app_console.messages
    assert all(f"retry {i}/5 in {w}s" in m for i, (m, w) in enumerate(zip(retries, retry_waits), 1)), retries
    assert "GET " in retries[0] and endpoint in retries[0]
    assert not [m for m in app_console.messages if "thrown while requesting" in m or m.startswith("Retrying")]
    assert not logging.getLogger("huggingface_hub.utils._http").filters  # the folding ends with the download


def test_unreachable_hub_with_other_files_in_ipadapter_folder_is_an_error(tmp_path):
    # The adapter goes into the shared ipadapter folder, which usually holds other adapters already.
    dest = _write(tmp_path / "ipadapter", {"ip-adapter_sd15.safetensors": b"other"})
    with unreachable_endpoint() as endpoint:
        with pytest.raises(DownloadError, match="internet connection"):
            hub.download(hub.ADAPTER, dest, endpoint=endpoint)
    assert not (dest / hub.ADAPTER_FILENAME).exists()


def test_unreachable_hub_after_partial_download_says_incomplete(repos, tmp_path):
    dest = tmp_path / "FLUX.1-dev"
    with HubStandin(repos) as hubstand:
        hubstand.fail(FLUX, SHARD, status=500)
        with pytest.raises(DownloadError):
            hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint)
    assert hub.missing_flux_files(dest) and not (dest / SHARD).exists()
    with unreachable_endpoint() as endpoint:
        with pytest.raises(DownloadError) as info:
            hub.download(hub.FLUX_DEV, dest, endpoint=endpoint)
    assert "connection" in str(info.value) and "by hand" in str(info.value)


def test_dropped_connection_resumes_with_range_and_file_is_identical(tmp_path):
    # huggingface_hub keeps the bytes of whole 10 MiB read pieces when a connection drops and asks for the rest
    # with a Range request; the file has to be larger than one piece for that to show.
    size, drop_at = 12 * 1024 * 1024 + 123, 11 * 1024 * 1024
    served = _write(tmp_path / "adapter", adapter_files(size))
    dest = tmp_path / "ipadapter"
    with HubStandin({ADAPTER: served}) as hubstand:
        hubstand.interrupt(ADAPTER, hub.ADAPTER_FILENAME, after_bytes=drop_at)
        path = hub.download(hub.ADAPTER, dest, endpoint=hubstand.endpoint)
        gets = hubstand.log(kind="cdn", file=hub.ADAPTER_FILENAME, method="GET")
    assert path.read_bytes() == (served / hub.ADAPTER_FILENAME).read_bytes()
    assert [g.status for g in gets] == [200, 206]
    assert gets[0].range is None and gets[1].range.startswith("bytes=")
    start = int(gets[1].range.split("=")[1].rstrip("-"))
    assert 0 < start <= drop_at  # 10 MiB with huggingface_hub 2.x (whole read pieces only)


def test_failed_transfer_leaves_folder_incomplete_and_next_call_completes_it(repos, tmp_path):
    dest = tmp_path / "FLUX.1-dev"
    with HubStandin(repos) as hubstand:
        hubstand.fail(FLUX, SHARD, status=500)
        with pytest.raises(DownloadError) as info:
            hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint)
        assert "run again" in str(info.value)
        # the folder does not count as present (the download stops its other transfers when one fails, so
        # the shard index may not have arrived either: then the shard is not listed by name)
        assert hub.missing_flux_files(dest) and not (dest / SHARD).exists()
        arrived = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts}
        assert not list(dest.rglob("*.lock")), "the failed download left huggingface_hub's lock files behind"
        hubstand.clear_log()
        assert hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint) == dest
        fetched = hubstand.files_downloaded(FLUX)
    assert SHARD in fetched
    assert not arrived & set(fetched), "files that had arrived were downloaded again"
    assert hub.missing_flux_files(dest) == []
    assert same_bytes(repos[FLUX], dest, wanted(hub.FLUX_DEV, repos[FLUX]))


def test_progress_counts_files_up_to_total(repos, tmp_path):
    calls: list[tuple[int, int]] = []
    with HubStandin(repos) as hubstand:
        hub.download(hub.FLUX_DEV, tmp_path / "FLUX.1-dev", progress=lambda done, total: calls.append((done, total)),
                     endpoint=hubstand.endpoint)
    total = len(wanted(hub.FLUX_DEV, repos[FLUX]))
    assert calls, "progress was never called"
    assert {t for _, t in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total


def test_guard_stops_requests_to_the_real_hub(tmp_path, isolated_hf):
    # endpoint=None means https://huggingface.co: the guard must refuse it before any connection is made.
    with pytest.raises(AssertionError, match="only the local stand-in"):
        hub.download(hub.SIGLIP, tmp_path / "siglip", endpoint=None)
    assert isolated_hf  # the refused address was recorded (teardown would fail the test on it)
    isolated_hf.clear()


def test_a_download_that_gets_nothing_leaves_no_folder(tmp_path):
    from instantcharacter.files import hub

    dest = tmp_path / "unet" / "FLUX.1-dev"
    with unreachable_endpoint() as url, pytest.raises(hub.DownloadError):
        hub.download(hub.FLUX_DEV, dest, endpoint=url)
    assert not dest.exists()


@pytest.mark.parametrize("name", ["scheduler/../../../../escaped.txt", "transformer/..\\..\\..\\escaped.txt",
                                  "vae/./x/../../../y.txt"])
def test_a_listed_name_that_leaves_the_folder_is_refused_and_nothing_is_written(repos, tmp_path, name):
    """A hostile endpoint (e.g. a mirror in HF_ENDPOINT) lists a name our wildcard patterns match but that points
    outside the FLUX folder: refused before any file is fetched, on whatever huggingface_hub is installed."""
    dest = tmp_path / "models" / "unet" / "FLUX.1-dev"
    payload = repos[FLUX] / "model_index.json"
    before = {p for p in tmp_path.rglob("*")}
    with HubStandin(repos, listed={FLUX: {name: payload}}) as hubstand:
        with pytest.raises(DownloadError, match="would be written outside") as info:
            hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint)
        assert hubstand.files_downloaded(FLUX) == []
    assert repr(name) in str(info.value) and "HF_ENDPOINT" in str(info.value)
    assert {p for p in tmp_path.rglob("*")} - before - {p for p in tmp_path.rglob("*") if "hf_home" in p.parts} == set()
    # the same server without the hostile name: the download completes as usual
    with HubStandin(repos) as hubstand:
        assert hub.download(hub.FLUX_DEV, dest, endpoint=hubstand.endpoint) == dest
    assert hub.missing_flux_files(dest) == []


def test_safe_relative_names():
    assert hub.safe_relative_name("transformer/diffusion_pytorch_model-00001-of-00003.safetensors")
    for name in ("", "../x", "a/../b", "/etc/passwd", "C:/x", "a//b", "a/./b", "\\\\server\\x", "a\\..\\b"):
        assert not hub.safe_relative_name(name), name
