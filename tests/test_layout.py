"""The core's structure: its parts import only parts below them, nothing imports in a circle, only nodes/ imports
ComfyUI, every module says what it is, and the offload package's rooms stay apart (the planner touches no device)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "instantcharacter"
# each part may import itself and the parts listed before it
LAYERS = ["errors", "cancel", "model", "reference", "files", "run", "testing", "cli", "__main__"]
COMFY = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution")
OFFLOAD = "instantcharacter.run.offload"
# the offload package's rooms, each importing only the rooms before it
OFFLOAD_ROOMS = ["layout", "planner", "host_packs", "streams", "streamer", "placement"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved; ``from . import x`` as x)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}
    return found


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "instantcharacter" and len(parts) > 1 else None


def _core_modules() -> dict[str, set[str]]:
    modules = {_module(p): _imports(p) for p in CORE.rglob("*.py")}
    return {m: {i for i in imports if i in modules} for m, imports in modules.items()}


def test_core_parts_import_only_parts_below_them():
    upward = []
    for module, imports in _core_modules().items():
        part = _part(module)
        if part is None:
            continue
        for target in imports:
            other = _part(target)
            if other is not None and LAYERS.index(other) > LAYERS.index(part):
                upward.append(f"{module} imports {target}")
    assert not upward, upward


def test_core_has_no_import_circles():
    graph = _core_modules()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + "."):  # a package importing its own modules is not a circle
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_only_nodes_import_comfyui():
    offenders = [f"{_module(p)} imports {name}" for p in list(CORE.rglob("*.py")) + [ROOT / "install.py"]
                 for name in _imports(p) if name.split(".")[0] in COMFY]
    assert not offenders, offenders


def test_every_module_opens_with_a_docstring():
    """Each module of the core and of nodes/ says what its one job is, first thing."""
    modules = list(CORE.rglob("*.py")) + list((ROOT / "nodes").glob("*.py"))
    silent = [str(p.relative_to(ROOT)) for p in modules
              if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not silent, silent


def test_the_offload_rooms_import_only_rooms_before_them_and_the_planner_touches_no_device():
    """The planner (and the layouts it counts) is pure arithmetic on shapes and dtypes, so it works on ``meta``
    models; packs, streams, the streamer and the placement build on it, never the other way round."""
    modules = _core_modules()
    backwards = []
    for room in OFFLOAD_ROOMS:
        for target in modules[f"{OFFLOAD}.{room}"]:
            other = target.removeprefix(f"{OFFLOAD}.").split(".")[0] if target.startswith(OFFLOAD + ".") else None
            if other in OFFLOAD_ROOMS and OFFLOAD_ROOMS.index(other) >= OFFLOAD_ROOMS.index(room):
                backwards.append(f"{room} imports {other}")
    assert not backwards, backwards
    for room in ("layout", "planner"):
        tree = ast.parse((CORE / "run" / "offload" / f"{room}.py").read_text(encoding="utf-8"))
        devices = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "cuda"]
        assert not devices, f"{room}.py uses torch.cuda at lines {devices}"
