"""Run a real ComfyUI (``COMFYUI_DIR``) with this pack and talk to it over HTTP, for the host tests."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def comfyui_dir() -> Path | None:
    value = os.environ.get("COMFYUI_DIR")
    return Path(value) if value and (Path(value) / "main.py").is_file() else None


SKIP_REASON = "COMFYUI_DIR is not set to a ComfyUI checkout (ComfyUI is not on PyPI; see README, Tests)"


def _front_end_args() -> list[str]:
    """``COMFYUI_FRONT_END_ROOT``: the ``static`` folder of an unpacked frontend wheel, so two ComfyUI generations
    that want different frontends can share one Python environment."""
    root = os.environ.get("COMFYUI_FRONT_END_ROOT")
    return ["--front-end-root", root] if root else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py --cpu`` on a free port, with the pack visible through an extra-model-paths
    ``custom_nodes`` entry (the ComfyUI checkout is not modified)."""

    def __init__(self, workdir: Path, models: Path, env: dict | None = None, args: tuple[str, ...] = ()):
        """``args``: more ``main.py`` arguments (e.g. ``--preview-method latent2rgb``)."""
        self.workdir = workdir
        self.models = models
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.input_dir = workdir / "input"
        self.output_dir = workdir / "output"
        self.log_path = workdir / "server.log"
        self.env = env or {}
        self.args = tuple(args)
        self.process = None

    def __enter__(self) -> "ComfyServer":
        nodes = self.workdir / "custom_nodes"
        for d in (nodes, self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        link = nodes / "ComfyUI-InstantCharacter"
        if not link.exists():
            link.symlink_to(PACK, target_is_directory=True)
        config = self.workdir / "extra_model_paths.yaml"
        config.write_text(
            "instantcharacter_tests:\n"
            f"  base_path: {self.models}\n"
            "  diffusion_models: unet\n  clip_vision: clip_vision\n  ipadapter: ipadapter\n  vae: vae\n"
            "  text_encoders: text_encoders\n  loras: loras\n  vae_approx: vae_approx\n"
            "  instantcharacter_characters: instantcharacter/characters\n"
            f"  custom_nodes: {nodes}\n"
        )
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_DISABLE_TELEMETRY="1", **self.env)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            # --base-directory: ComfyUI's own folders (custom_nodes, user, temp, models) in workdir, so the ComfyUI
            # tree is only read, and need not have a custom_nodes folder (v0.33 lists it at start-up)
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.workdir),
             "--extra-model-paths-config", str(config), "--output-directory", str(self.output_dir),
             "--input-directory", str(self.input_dir), "--disable-auto-launch", *_front_end_args(), *self.args],
            cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                self.get("/object_info/InstantCharacterSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in 180 s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def plain_log(self) -> str:
        """The whole log without the colour codes newer ComfyUIs put in it."""
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def post(self, path: str, payload: dict) -> None:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()

    def post_prompt(self, prompt: dict, client_id: str | None = None, extra_data: dict | None = None) -> str:
        """``extra_data``: what the frontend sends beside the graph (e.g. its per-run ``preview_method``)."""
        body = {"prompt": prompt, **({"client_id": client_id} if client_id else {}),
                **({"extra_data": extra_data} if extra_data else {})}
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.load(r)["prompt_id"]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"/prompt refused the graph: {err.read().decode()}") from err

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Post a prompt and return its history entry once it has finished (success or error)."""
        prompt_id = self.post_prompt(prompt)
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def cancel_while_running(self, prompt: dict, timeout: float, settle: float = 3.0) -> tuple[dict, float]:
        """Post a prompt, press Cancel (``/interrupt``) ``settle`` seconds after it starts running, and return its
        history entry once it has finished and the seconds from the press to then."""
        prompt_id = self.post_prompt(prompt)
        deadline = time.time() + timeout
        while time.time() < deadline and not any(item[1] == prompt_id for item in self.get("/queue")["queue_running"]):
            time.sleep(0.2)
        time.sleep(settle)
        pressed = time.time()
        self.post("/interrupt", {})
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry, time.time() - pressed
            time.sleep(0.2)
        raise AssertionError(f"the cancelled prompt {prompt_id} never finished:\n{self.log_tail()}")

    def run_watched(self, prompt: dict, timeout: float = 600, extra_data: dict | None = None) -> tuple[dict, list]:
        """Run a prompt as a browser tab would, connected to the websocket under the client id the prompt is posted
        with; returns the history entry and every message sent to that client during the run: ("json", type,
        data) or ("binary", event type, payload)."""
        import asyncio
        import uuid

        import aiohttp

        client_id = uuid.uuid4().hex

        async def watch():
            messages = []
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url.replace('http', 'ws')}/ws?clientId={client_id}",
                                              max_msg_size=0) as ws:
                    prompt_id = await asyncio.to_thread(self.post_prompt, prompt, client_id, extra_data)
                    deadline = time.time() + timeout
                    while time.time() < deadline:
                        msg = await ws.receive(timeout=max(1.0, deadline - time.time()))
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            messages.append(("binary", int.from_bytes(msg.data[:4], "big"), msg.data[4:]))
                            continue
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            raise AssertionError(f"websocket closed ({msg.type}):\n{self.log_tail()}")
                        data = json.loads(msg.data)
                        messages.append(("json", data["type"], data.get("data", {})))
                        body = data.get("data") or {}
                        if body.get("prompt_id") == prompt_id and (
                                data["type"] in ("execution_success", "execution_error", "execution_interrupted")
                                or (data["type"] == "executing" and body.get("node") is None)):
                            return prompt_id, messages
                    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

        prompt_id, messages = asyncio.run(watch())
        deadline = time.time() + 30
        while time.time() < deadline:  # the history entry is written as the run ends
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry, messages
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} has no history entry:\n{self.log_tail()}")


def error_message(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def widget_inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node's widget inputs in the frontend's order: required, then optional."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            options = spec[1] if len(spec) > 1 else {}
            if kind in WIDGET_TYPES and not options.get("forceInput"):
                out.append((name, kind, options))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a workflow saved by the ComfyUI frontend to the /prompt API format.

    Widget values are matched to the node's widget inputs in order; the frontend stores one extra value
    after a seed with control_after_generate, and one after an image combo with an upload button.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        inputs = {}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        for name, kind, options in widget_inputs(info):
            if not values:
                raise ValueError(f"{node['type']} (node {node['id']}): no widget value left for '{name}'")
            value = values.pop(0)
            if options.get("control_after_generate"):
                values.pop(0)
            if options.get("image_upload"):
                values.pop(0)
            if name not in linked:
                inputs[name] = value
        if values:
            raise ValueError(f"{node['type']} (node {node['id']}): {len(values)} widget value(s) left over: {values}")
        for name, link in linked.items():
            inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def combo_options(object_info: dict, class_type: str, name: str) -> list | None:
    """The values a combo input of a node offers (None: not a combo); newer ComfyUIs refuse any other value."""
    info = object_info[class_type]["input"]
    spec = info.get("required", {}).get(name) or info.get("optional", {}).get(name)
    if spec is None or not (isinstance(spec[0], list) or spec[0] == "COMBO"):
        return None
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
