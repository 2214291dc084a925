"""A storyboard's panels as Ray tasks, on Ray actors that each load the models once.

Ray (``pip install "ray>=2.50"``) is optional: it is imported here, and only when a board runs on it. One actor per
GPU of the cluster (``num_gpus=1``); on a cluster without GPUs, one CPU actor per machine (or as many as asked), each
with an equal share of the cores. Ray's own ActorPool hands each actor its next panel when it is free. When an
actor's process or machine is lost, Ray starts the actor again (it reloads the models) and runs the panel it held
again (``max_restarts`` / ``max_task_retries``); a panel's seeds make the retried panel the same picture. Results
come back to the caller in panel order, and the caller's manifest (:mod:`..files.storyboard_folder`) makes sure no
panel is written twice. The pack's code travels to the cluster with the job (Ray's ``py_modules``); the models
must be at the same paths on every machine (a shared models folder).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import InputError, InstantCharacterError
from .storyboard import Board, BoardModels, PanelResult, render_panel

RETRIES = 3  # restarts of a lost actor, and retries of the panel it was drawing
INSTALL_HINT = 'pip install "ray>=2.50"'
PACKAGE = Path(__file__).resolve().parents[1]


@dataclass
class BoardJob:
    """Everything an actor needs to draw any panel: the models' paths (the same on every machine), their dtype
    (``bf16``/``fp16``/``fp32``), the board and the character."""

    paths: dict
    dtype: str
    board: Board
    character: object


class PanelActor:
    """Holds the models of one board on one GPU (or a share of one machine's cores) and draws panels."""

    def __init__(self, job: BoardJob, threads: int | None = None):
        """``job`` without its character, which comes with each panel (see :func:`panels_on_ray`)."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[job.dtype]
        self.job = job
        self.models = BoardModels.load({k: Path(v) for k, v in job.paths.items()}, dtype)

    def where(self) -> dict:
        import ray
        import torch

        gpus = ", ".join(str(g) for g in ray.get_gpu_ids())
        device = f"cuda (GPU {gpus})" if torch.cuda.is_available() else "cpu"
        return {"host": platform.node(), "pid": os.getpid(), "device": device, "threads": torch.get_num_threads()}

    def render(self, number: int, character) -> PanelResult:
        return render_panel(self.models, self.job.board, character, number)


def require_ray():
    try:
        import ray
    except ImportError as err:
        raise InputError(f"--ray needs Ray, which is not installed: {INSTALL_HINT} (Python {platform.python_version()}"
                         "), or leave --ray out to draw the panels here.") from err
    return ray


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the one RAY_ADDRESS or ``ray start`` on this machine names,
    else a new one on this machine). Returns whether this call connected (and so must disconnect)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    runtime_env = {"py_modules": [str(PACKAGE)], "excludes": ["__pycache__", "*.pyc"]}
    try:
        ray.init(address=None if address == "auto" else address, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise InstantCharacterError(f"Could not join the Ray cluster at {address!r} ({err}). Start one with "
                                    "`ray start --head` and give its address, or use --ray auto.") from err
    return True


def actor_options(requested: int | None) -> tuple[int, dict, int | None]:
    """How many actors, the Ray options of each, and the torch threads of a CPU actor."""
    ray = require_ray()
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if requested is not None and requested < 1:
        raise InputError(f"--ray-actors must be 1 or more, got {requested}.")
    if gpus:
        count = requested or gpus
        if count > gpus:
            raise InputError(f"The Ray cluster has {gpus} GPU(s); {count} actors of one GPU each would wait forever. "
                             f"Use --ray-actors {gpus} or fewer.")
        return count, {"num_gpus": 1, "scheduling_strategy": "SPREAD"}, None
    machines = sorted((int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                      reverse=True)
    count = requested or max(1, len(machines))
    if count > cpus:
        raise InputError(f"The Ray cluster has {cpus} CPU core(s) and no GPU; {count} actors need one core each at "
                         f"least. Use --ray-actors {cpus} or fewer.")
    # an equal share of the cores, never more than the machines that will hold the actors have
    share = max(1, min(cpus // count, min(machines[:count]) if count <= len(machines) else machines[0]))
    return count, {"num_cpus": share, "scheduling_strategy": "SPREAD"}, share


def _ray_errors(ray, err: Exception) -> Exception:
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, InstantCharacterError):
        return err.cause
    if isinstance(err, ray.exceptions.RayActorError):
        return InstantCharacterError(f"A Ray actor was lost more than {RETRIES} times (or could not load the models): "
                                     f"{err}. Check that every machine has the models at the same paths, and the "
                                     "Ray logs of the cluster.")
    return err


def panels_on_ray(job: BoardJob, numbers: Iterable[int], address: str = "auto", actors: int | None = None,
                  on_ready: Callable[[list[dict]], None] | None = None) -> Iterator[PanelResult]:
    """Draw the panels ``numbers`` of ``job.board`` on Ray actors; yields them in panel order as they are done.
    ``on_ready(where)`` gets each actor's host, process id, device and threads once all have loaded the models."""
    numbers = sorted(set(numbers))
    if not numbers:
        return
    ray = require_ray()
    from ray.util import ActorPool

    started = connect(address)
    handles = []
    try:
        count, options, threads = actor_options(actors)
        remote = ray.remote(PanelActor).options(max_restarts=RETRIES, max_task_retries=RETRIES, **options)
        # The character (megabytes) goes to the object store once and comes with every panel: as an argument of the
        # actors' constructor, Ray could not restart a lost actor once that object were gone.
        character = ray.put(job.character)
        light = dataclasses.replace(job, character=None)
        handles = [remote.remote(light, threads) for _ in range(min(count, len(numbers)))]
        where = ray.get([h.where.remote() for h in handles])
        if on_ready is not None:
            on_ready(where)
        finished: dict[int, PanelResult] = {}
        waiting = iter(numbers)
        next_number = next(waiting)
        for result in ActorPool(handles).map_unordered(lambda actor, n: actor.render.remote(n, character), numbers):
            finished[result.number] = result
            while next_number in finished:
                yield finished.pop(next_number)
                next_number = next(waiting, None)
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
        raise _ray_errors(ray, err) from err
    finally:
        for handle in handles:
            ray.kill(handle)
        if started:
            ray.shutdown()
