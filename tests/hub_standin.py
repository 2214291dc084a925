"""A local stand-in for the Hugging Face Hub, for download tests.

It serves local folders as model repos, well enough for ``huggingface_hub.snapshot_download`` /
``hf_hub_download`` with ``endpoint=hub.endpoint``::

    with HubStandin({"org/name": folder}, gated={"org/name"}, token="hf_test") as hub:
        snapshot_download("org/name", local_dir=..., endpoint=hub.endpoint)
        assert "big.safetensors" not in hub.files_requested("org/name")

What it answers (the requests huggingface_hub makes; checked against huggingface_hub 2.4):

* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: repo info (``id``, ``sha`` = a commit
  hash derived from the folder's contents, ``siblings`` for older clients, ``gated``).
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing (``type``, ``path``, ``size``,
  ``oid`` = git blob sha1, ``lfs`` = ``{oid: sha256, size, pointerSize}`` for large-file suffixes), one page.
* ``POST /api/models/{repo}/paths-info/{rev}``: the same entries for the ``paths`` asked for.
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: regular files answer 200 with ``X-Repo-Commit``, ``ETag`` (git blob
  sha1) and ``Content-Length``; large (LFS) files answer ``302`` to a "CDN" address on ``localhost`` (a different
  origin than ``127.0.0.1``, so the client treats it as a CDN: it keeps the metadata of the redirect,
  ``X-Linked-Etag`` = sha256 and ``X-Linked-Size``, and drops the ``Authorization`` header), like the real Hub.
  ``rev`` is ``main`` or the commit hash.
* ``GET /_cdn/{repo}/{commit}/{path}``: the file bytes, with ``Range: bytes=N-`` answered by ``206`` +
  ``Content-Range``.

Errors look like the Hub's (``X-Error-Code`` / ``X-Error-Message`` headers and a JSON ``error`` body), which
huggingface_hub maps onto its exceptions:

* unknown repo -> 401 (no token) / 404 (with a token) ``RepoNotFound`` -> ``RepositoryNotFoundError``;
* gated repo (repo info and listing stay public, as on the Hub) -> ``/resolve`` answers 401 ``GatedRepo`` without
  ``Authorization`` and 403 ``GatedRepo`` with a wrong token -> ``GatedRepoError``;
* unknown revision -> 404 ``RevisionNotFound``; unknown file -> 404 ``EntryNotFound``.

Faults for tests: ``interrupt(repo, path, after_bytes, times=1)`` drops the connection after ``after_bytes`` bytes
of the next file transfer(s); ``fail(repo, path, status=500, times=1)`` answers the next transfer(s) with an error.

Every request is logged (``hub.requests``: :class:`Request` records); ``hub.unhandled`` lists requests the
stand-in did not understand (a newer huggingface_hub asking for something new), so tests can assert it is empty.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Iterator, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".pth", ".ckpt", ".msgpack", ".onnx", ".gguf", ".h5")
_CHUNK = 64 * 1024


@dataclass
class Request:
    method: str
    host: str  # the Host header, e.g. "127.0.0.1:1234" or "localhost:1234" (the CDN stand-in)
    path: str  # URL path, unquoted
    query: dict[str, list[str]]
    kind: str  # "info", "tree", "paths-info", "resolve", "cdn" or "unknown"
    repo: str | None = None
    file: str | None = None  # repo-relative file path for "resolve" / "cdn"
    range: str | None = None  # the Range header
    authorization: str | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fault:
    remaining: int
    after_bytes: int = 0
    status: int = 0


class HubStandin:
    """Serve ``repos`` (``{"org/name": folder}``) as Hub model repos on ``127.0.0.1`` (a free port).

    ``gated``: repo ids whose files need ``Authorization: Bearer <token>``. ``token``: the token that opens them
    (also accepted for any repo). ``lfs_suffixes``: file suffixes served as LFS files (CDN redirect, sha256 ETag).
    """

    def __init__(self, repos: Mapping[str, str | Path], *, gated: Iterable[str] = (), token: str | None = None,
                 lfs_suffixes: Iterable[str] = LFS_SUFFIXES, listed: Mapping[str, Mapping[str, Path]] | None = None):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        # extra names a hostile server lists (e.g. "scheduler/../../x"), each served with a real file's bytes
        self.listed = {repo_id: dict(names) for repo_id, names in (listed or {}).items()}
        self.gated = set(gated)
        unknown = self.gated - set(self.repos)
        if unknown:
            raise ValueError(f"gated repos not served: {sorted(unknown)}")
        self.token = token
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.requests: list[Request] = []
        self._faults: dict[tuple[str, str], list[_Fault]] = {}
        self._digests: dict[Path, tuple[tuple[int, int], str, str]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> "HubStandin":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "HubStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the stand-in is not running")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """The address to pass as ``endpoint=`` (or ``HF_ENDPOINT``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self.port}"

    # ---- faults ---------------------------------------------------------------------------------------------

    def interrupt(self, repo: str, path: str, after_bytes: int, times: int = 1) -> None:
        """Drop the connection after ``after_bytes`` bytes of the body, on the next ``times`` transfers of the
        file (GETs of its bytes; a ranged GET counts from the start of the range).

        huggingface_hub 2.x reads a body in ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) pieces and, when the
        connection drops, asks again with ``Range: bytes=<bytes of the whole pieces it got>-`` (after a 1 s
        pause). So a ranged resume shows only for a file larger than one piece with ``after_bytes`` past it;
        below that the client simply fetches the file again from the start."""
        with self._lock:
            self._faults.setdefault((repo, path), []).append(_Fault(times, after_bytes=after_bytes))

    def fail(self, repo: str, path: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` transfers (GETs of the bytes) of the file with HTTP ``status``."""
        with self._lock:
            self._faults.setdefault((repo, path), []).append(_Fault(times, status=status))

    def _take_fault(self, repo: str, path: str) -> _Fault | None:
        with self._lock:
            faults = self._faults.get((repo, path), [])
            for fault in faults:
                if fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    # ---- log queries ----------------------------------------------------------------------------------------

    def log(self, kind: str | None = None, repo: str | None = None, file: str | None = None,
            method: str | None = None) -> list[Request]:
        with self._lock:
            records = list(self.requests)
        return [r for r in records if (kind is None or r.kind == kind) and (repo is None or r.repo == repo)
                and (file is None or r.file == file) and (method is None or r.method == method)]

    def count(self, kind: str | None = None, repo: str | None = None, file: str | None = None,
              method: str | None = None) -> int:
        return len(self.log(kind, repo, file, method))

    def files_requested(self, repo: str | None = None) -> set[str]:
        """Files of ``repo`` that were asked about at all (HEAD or GET, on the Hub or the CDN)."""
        return {r.file for r in self.log(repo=repo) if r.kind in ("resolve", "cdn") and r.file}

    def files_downloaded(self, repo: str | None = None) -> list[str]:
        """Files of ``repo`` whose bytes were sent (successful GETs), in order, repeats included."""
        return [r.file for r in self.log(repo=repo, method="GET")
                if r.kind in ("resolve", "cdn") and r.file and r.status in (200, 206)]

    @property
    def unhandled(self) -> list[Request]:
        return self.log(kind="unknown")

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---- repo model -----------------------------------------------------------------------------------------

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        # a folder that was itself a download target holds huggingface_hub's bookkeeping: not repo content
        files = {rel: p for rel, p in files.items() if not rel.startswith((".git/", ".cache/huggingface/"))}
        return {**files, **self.listed.get(repo, {})}

    def is_lfs(self, path: str) -> bool:
        return path.endswith(self.lfs_suffixes)

    def digests(self, file: Path) -> tuple[int, str, str]:
        """(size, git blob sha1, sha256) of a file, cached while its size and mtime stay the same."""
        stat = file.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._digests.get(file)
        if cached is None or cached[0] != key:
            data = file.read_bytes()
            cached = (key, _git_blob_sha1(data), hashlib.sha256(data).hexdigest())
            with self._lock:
                self._digests[file] = cached
        return cached[0][0], cached[1], cached[2]

    def entry(self, repo: str, path: str, file: Path) -> dict:
        size, blob_sha1, sha256 = self.digests(file)
        entry = {"type": "file", "path": path, "size": size, "oid": blob_sha1}
        if self.is_lfs(path):
            entry["lfs"] = {"oid": sha256, "size": size, "pointerSize": 134}
        return entry

    def commit(self, repo: str) -> str:
        """A commit hash derived from the repo's paths and contents (it changes when the folder does)."""
        digest = hashlib.sha1(repo.encode())
        for path, file in self.files(repo).items():
            digest.update(f"{path}\0{self.digests(file)[1]}\0".encode())
        return digest.hexdigest()

    def authorized(self, repo: str, authorization: str | None) -> bool:
        return repo not in self.gated or (self.token is not None and authorization == f"Bearer {self.token}")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_HEAD(self):
        self._dispatch(body=False)

    def do_GET(self):
        self._dispatch(body=True)

    def do_POST(self):
        self._dispatch(body=True)

    # ---- dispatch ---------------------------------------------------------------------------------------------

    def _dispatch(self, body: bool) -> None:
        url = urlsplit(self.path)
        record = Request(method=self.command, host=self.headers.get("Host", ""), path=unquote(url.path),
                         query=parse_qs(url.query), kind="unknown", range=self.headers.get("Range"),
                         authorization=self.headers.get("Authorization"), headers=dict(self.headers.items()))
        with self.hub._lock:
            self.hub.requests.append(record)
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length) if length else b""
        try:
            self._route(record, url.path, payload, body)
        except _HubError as err:
            self._send_error(record, err, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, record: Request, raw_path: str, payload: bytes, body: bool) -> None:
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            record.repo = repo
            if not rest or rest[0] == "revision":
                record.kind = "info"
                return self._info(record, repo, rest[1] if len(rest) > 1 else "main", body)
            if rest[0] == "tree" and len(rest) >= 2:
                record.kind = "tree"
                return self._tree(record, repo, rest[1], "/".join(rest[2:]), body)
            if rest[0] == "paths-info" and len(rest) >= 2 and self.command == "POST":
                record.kind = "paths-info"
                return self._paths_info(record, repo, rest[1], payload)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = f"{parts[0]}/{parts[1]}"
            record.kind, record.repo, record.file = "resolve", repo, "/".join(parts[4:])
            return self._resolve(record, repo, parts[3], record.file, body)
        if parts and parts[0] == "_cdn" and len(parts) >= 5:
            repo = f"{parts[1]}/{parts[2]}"
            record.kind, record.repo, record.file = "cdn", repo, "/".join(parts[4:])
            return self._cdn(record, repo, parts[3], record.file, body)
        raise _HubError(404, None, f"stand-in does not serve {self.command} {raw_path}")

    # ---- endpoints --------------------------------------------------------------------------------------------

    def _repo(self, repo: str, revision: str) -> str:
        if repo not in self.hub.repos:
            authenticated = self.headers.get("Authorization") is not None
            raise _HubError(404 if authenticated else 401, "RepoNotFound", "Repository not found")
        commit = self.hub.commit(repo)
        if revision not in ("main", commit):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _info(self, record: Request, repo: str, revision: str, body: bool) -> None:
        commit = self._repo(repo, revision)
        files = self.hub.files(repo)
        info = {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repo.split("/")[0], "sha": commit, "lastModified": "2024-08-16T00:00:00.000Z",
            "private": False, "disabled": False, "gated": "manual" if repo in self.hub.gated else False,
            "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": path} for path in files],
        }
        self._send_json(record, info, body)

    def _tree(self, record: Request, repo: str, revision: str, under: str, body: bool) -> None:
        self._repo(repo, revision)
        recursive = record.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{under}/" if under else ""
        entries, folders = [], set()
        for path, file in self.hub.files(repo).items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if "/" in rel:
                dirs = rel.split("/")[:-1]
                for depth in range(1, len(dirs) + 1 if recursive else 2):
                    folders.add(prefix + "/".join(dirs[:depth]))
                if not recursive:
                    continue
            entries.append(self.hub.entry(repo, path, file))
        if under and not entries and not folders:
            raise _HubError(404, "EntryNotFound", f"{under} does not exist on {revision}")
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                    for d in sorted(folders)]
        self._send_json(record, sorted(entries, key=lambda e: e["path"]), body)

    def _paths_info(self, record: Request, repo: str, revision: str, payload: bytes) -> None:
        self._repo(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(payload or b"{}").get("paths", [])
        else:
            paths = parse_qs(payload.decode()).get("paths", [])
        files = self.hub.files(repo)
        self._send_json(record, [self.hub.entry(repo, p, files[p]) for p in paths if p in files], True)

    def _resolve(self, record: Request, repo: str, revision: str, path: str, body: bool) -> None:
        commit = self._repo(repo, revision)
        if not self.hub.authorized(repo, record.authorization):
            if record.authorization is None:
                message = (f"Access to model {repo} is restricted. You must have access to it and be authenticated "
                           "to access it. Please log in.")
                raise _HubError(401, "GatedRepo", message)
            raise _HubError(403, "GatedRepo", f"Access to model {repo} is restricted and you are not in the "
                                              f"authorized list. Visit https://huggingface.co/{repo} to ask for access.")
        files = self.hub.files(repo)
        if path not in files:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                            {"X-Repo-Commit": commit})
        entry = self.hub.entry(repo, path, files[path])
        if "lfs" in entry:
            location = f"{self.hub.cdn}/_cdn/{quote(repo)}/{commit}/{quote(path)}?sha256={entry['lfs']['oid']}"
            self._start(record, 302, {
                "Location": location, "X-Repo-Commit": commit, "X-Linked-Etag": f'"{entry["lfs"]["oid"]}"',
                "X-Linked-Size": str(entry["size"]), "ETag": f'"{entry["oid"]}"', "Content-Length": "0",
            })
            return
        self._send_file(record, repo, path, files[path], {"X-Repo-Commit": commit, "ETag": f'"{entry["oid"]}"'},
                        body)

    def _cdn(self, record: Request, repo: str, commit: str, path: str, body: bool) -> None:
        # A signed CDN address: no authorization needed, the commit is immutable.
        if repo not in self.hub.repos or commit != self.hub.commit(repo) or path not in self.hub.files(repo):
            raise _HubError(404, None, "NoSuchKey")
        file = self.hub.files(repo)[path]
        etag = self.hub.digests(file)[2]
        self._send_file(record, repo, path, file, {"ETag": f'"{etag}"'}, body)

    # ---- responses --------------------------------------------------------------------------------------------

    def _start(self, record: Request, status: int, headers: dict[str, str]) -> None:
        record.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_json(self, record: Request, data, body: bool) -> None:
        raw = json.dumps(data).encode()
        self._start(record, 200, {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(raw))})
        if body:
            self.wfile.write(raw)

    def _send_error(self, record: Request, err: _HubError, body: bool) -> None:
        raw = json.dumps({"error": err.message}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(raw)), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._start(record, err.status, headers)
        if body:
            self.wfile.write(raw)

    def _send_file(self, record: Request, repo: str, path: str, file: Path, headers: dict[str, str],
                   body: bool) -> None:
        data = file.read_bytes()
        size = len(data)
        start, status = 0, 200
        range_header = self.headers.get("Range")
        if range_header:
            start, end = _parse_range(range_header, size)
            if start >= size:
                raise _HubError(416, None, f"Range not satisfiable: {range_header}",
                                {"Content-Range": f"bytes */{size}"})
            data, status = data[start:end + 1], 206
            headers = {**headers, "Content-Range": f"bytes {start}-{start + len(data) - 1}/{size}"}
        fault = self.hub._take_fault(repo, path) if body and self.command == "GET" else None
        if fault is not None and fault.status:
            raise _HubError(fault.status, None, f"stand-in: injected HTTP {fault.status}")
        self._start(record, status, {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(data)),
                                     "Content-Type": "application/octet-stream"})
        if not body:
            return
        if fault is not None:
            self.wfile.write(data[:fault.after_bytes])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        for offset in range(0, len(data), _CHUNK):
            self.wfile.write(data[offset:offset + _CHUNK])


def _parse_range(header: str, size: int) -> tuple[int, int]:
    unit, _, spec = header.partition("=")
    first = spec.split(",")[0].strip()
    if unit.strip() != "bytes" or "-" not in first:
        raise _HubError(416, None, f"bad Range header: {header}")
    start_s, _, end_s = first.partition("-")
    if not start_s:  # suffix range: the last N bytes
        n = int(end_s)
        return max(size - n, 0), size - 1
    return int(start_s), min(int(end_s), size - 1) if end_s else size - 1


@contextmanager
def unreachable_endpoint() -> Iterator[str]:
    """An ``http://127.0.0.1:<port>`` address where nothing listens (connections are refused): the port is
    held by a bound, non-listening socket for the duration, so nothing else can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
