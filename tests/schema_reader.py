"""Read the pack's node schemas without ComfyUI, for checking the shipped workflows in CI.

``nodes/`` imports ComfyUI (``comfy_api.latest.io``, ``folder_paths`` …), which is not on PyPI. This module
puts minimal stand-ins for those modules in ``sys.modules`` that only *record* what ``define_schema``
declares (input ids, kinds, options, optional, control_after_generate), imports the pack under a private
name, and returns each node's schema. ``pack_nodes`` gives the nodes themselves, for core tests that call a
node's ``execute`` on the CPU. The host tests check the same workflows against a real ComfyUI's ``/object_info``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass
class InputSpec:
    id: str
    kind: str
    optional: bool = False
    options: list | None = None
    control_after_generate: bool = False
    tooltip: str | None = None
    force_input: bool = False  # a socket only: the frontend stores no widget value for it


@dataclass
class NodeSchema:
    node_id: str
    inputs: list[InputSpec] = field(default_factory=list)
    description: str = ""

    def widgets(self) -> list[InputSpec]:
        """Widget inputs in the order the frontend stores their values: required, then optional."""
        ws = [i for i in self.inputs if i.kind in WIDGET_KINDS and not i.force_input]
        return [i for i in ws if not i.optional] + [i for i in ws if i.optional]


def _kind(kind: str):
    class Input:
        def __init__(self, id, *args, optional=False, options=None, control_after_generate=False, tooltip=None,
                     force_input=False, **kwargs):
            self.spec = InputSpec(id, kind, optional, options, bool(control_after_generate), tooltip,
                                  bool(force_input))

    class Output:
        def __init__(self, *args, **kwargs):
            pass

    return type(kind, (), {"Input": Input, "Output": Output, "io_type": kind})


def _install_standins() -> dict:
    io = types.ModuleType("comfy_api.latest.io")
    for name, kind in {"Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN",
                       "Combo": "COMBO", "Image": "IMAGE", "Mask": "MASK", "Latent": "LATENT",
                       "Model": "MODEL"}.items():
        setattr(io, name, _kind(kind))
    io.Custom = _kind

    class Schema:
        def __init__(self, node_id, inputs=(), description="", **kwargs):
            self.node_id, self.inputs, self.description = node_id, inputs, description

    io.Schema = Schema
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = lambda *a, **k: a
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ComfyExtension = type("ComfyExtension", (), {})
    comfy_api = types.ModuleType("comfy_api")
    comfy_api.latest = latest

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = "/nonexistent"
    folder_paths.supported_pt_extensions = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
    folder_paths.folder_names_and_paths = {}
    folder_paths.add_model_folder_path = lambda name, path, is_default=False: \
        folder_paths.folder_names_and_paths.setdefault(name, ([path], set()))
    folder_paths.get_folder_paths = lambda name: []
    folder_paths.get_filename_list = lambda name: []
    folder_paths.get_full_path = lambda name, file: None

    comfy = types.ModuleType("comfy")
    for sub in ("utils", "model_management", "model_patcher", "patcher_extension", "sd"):
        setattr(comfy, sub, types.ModuleType(f"comfy.{sub}"))
    comfy.model_management.get_torch_device = lambda: "cpu"
    comfy.model_management.throw_exception_if_processing_interrupted = lambda: None  # nobody presses Cancel here
    return {"comfy_api": comfy_api, "comfy_api.latest": latest, "comfy_api.latest.io": io,
            "folder_paths": folder_paths, "comfy": comfy,
            **{f"comfy.{s}": getattr(comfy, s) for s in ("utils", "model_management", "model_patcher",
                                                         "patcher_extension", "sd")}}


@contextlib.contextmanager
def pack_nodes():
    """The pack's ``nodes`` module, imported against the stand-ins (ComfyUI's device is the CPU); the stand-ins
    and the private copy of the pack are removed on leaving."""
    saved = {name: sys.modules.get(name) for name in ("comfy_api", "comfy_api.latest", "comfy_api.latest.io",
                                                      "folder_paths", "comfy")}
    standins = _install_standins()
    sys.modules.update(standins)
    try:
        spec = importlib.util.spec_from_file_location("instantcharacter_pack_schema", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        yield importlib.import_module(f"{spec.name}.nodes")
    finally:
        for name in list(sys.modules):
            if name.startswith("instantcharacter_pack_schema") or name in standins:
                del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if v is not None})


def read_schemas() -> dict[str, NodeSchema]:
    """node_id → recorded schema, for every node the pack exports."""
    with pack_nodes() as nodes:
        out = {}
        for node in nodes.NODES:
            schema = node.define_schema()
            out[schema.node_id] = NodeSchema(schema.node_id, [i.spec for i in schema.inputs], schema.description)
        return out
