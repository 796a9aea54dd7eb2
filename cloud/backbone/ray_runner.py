"""The frozen middle on a Ray cluster: the backbone seam over a pool of :class:`MiddleWorker` actors.

* **Where things live.** The coordinator keeps TLS, sessions, the registry and the edge streams; it
  never runs the middle. Each worker is a Ray actor that loads the model itself (the coordinator's
  model directory, or ``--model`` resolved on its node); only hidden states and gradients cross Ray.
* **Placement.** A session goes to the live worker with the fewest recently active sessions, and
  stays there: a step's backward reaches the worker that holds its forward's graph (affinity; the
  stateless alternative, recomputing the forward at the backward, costs one more forward per step,
  measured in docs/scale-out.md). ``--ray-workers N`` workers run on every node; a node that joins the
  cluster gets its workers within seconds and takes new sessions without a restart.
* **Failure.** Ray restarts a dead worker (the model loads again). Its sessions move to a live worker
  at their next call: an evaluation forward is retried there at once; a training step whose graph
  died raises :class:`~cloud.errors.Unavailable`, which the edge retries (the whole step, from clean
  gradients), so the run loses one retried step and its result is unchanged.

Ray is imported only here, and only when ``serve --backbone ray`` asks for it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloud.backbone.conversation import Answer, Callout, Finished
from cloud.backbone.seam import RunnerError, SiteCalls
from cloud.errors import Unavailable
from protocol.types import Phase

log = logging.getLogger("edgetune.cloud.ray")
STATUS_FILE = "backbone-status.json"  # in the store; `edgetune-cloud status` reads it
ACTIVE_S = 60.0  # a session counts towards its worker's load for this long after its last call


class RayConnectError(ConnectionError):
    """The Ray cluster named by ``--ray-address`` cannot be reached; one line, with the fix."""


@dataclass(frozen=True)
class RaySettings:
    """``serve --backbone ray`` settings."""

    address: str | None = None  # None: start a local Ray instance; "auto" or "HOST:PORT" or "ray://HOST:PORT"
    workers_per_node: int = 1
    worker_threads: int = 0  # torch threads per worker (0: torch's default in the worker)
    batch: bool = False
    batch_window_s: float = 0.01
    local_cpus: int | None = None  # CPUs of a local instance (None: all)

    def problems(self) -> list[str]:
        out = []
        if self.workers_per_node < 1:
            out.append(f"--ray-workers {self.workers_per_node}: must be at least 1")
        if self.batch_window_s < 0:
            out.append("--batch-window-ms must not be negative")
        if self.address not in (None, "auto") and ":" not in self.address.removeprefix("ray://"):
            out.append(f"--ray-address {self.address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
        return out


@dataclass
class _Worker:
    name: str
    node_id: str
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    live: bool = False
    pending: Any = None  # the readiness call in flight
    failures: int = 0


def connect(settings: RaySettings) -> bool:
    """Joins the cluster at ``settings.address`` or starts a local instance; True if we started it.

    Raises:
        RayConnectError: the address does not answer (checked with a plain TCP connect first, so a
            wrong address fails in seconds instead of Ray's minute of retries).
    """
    import ray

    if ray.is_initialized():  # this process already drives a cluster (tests, notebooks): use it
        return False
    if settings.address is None:
        os.environ.setdefault("RAY_worker_niceness", "0")  # the workers are the compute (cloud/backbone/cpu.py)
        ray.init(address="local", num_cpus=settings.local_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        return True
    if settings.address != "auto":
        host, _, port = settings.address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise RayConnectError(f"--ray-address {settings.address}: no Ray cluster answers there ({err}); start "
                                  "one with `ray start --head` and give its address, or leave --ray-address out "
                                  "for a local instance") from None
    try:
        ray.init(address=settings.address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        raise RayConnectError(f"--ray-address {settings.address}: cannot join the Ray cluster: "
                              f"{str(err).splitlines()[0]}; start one with `ray start --head`") from None
    return False


class RayPool:
    """The workers of the cluster, session placement and the operator's status.

    Args:
        settings: the Ray settings.
        model_dir: the coordinator's model directory (workers on this machine load it from there).
        model_name: ``--model`` (workers on other machines resolve it themselves).
        dtype: the middle's compute dtype name.
        status_file: where the status is written every few seconds (``None``: nowhere).
    """

    def __init__(self, settings: RaySettings, model_dir: Path, model_name: str, dtype: str = "float32",
                 status_file: Path | None = None) -> None:
        import ray

        from cloud.backbone.ray_worker import MiddleWorker

        self.settings, self.status_file = settings, status_file
        self._args = (str(model_dir.resolve()), model_name, dtype, settings.worker_threads,
                      settings.batch_window_s if settings.batch else None, 8, settings.workers_per_node)
        self._actor_class = ray.remote(MiddleWorker)
        self._workers: dict[str, _Worker] = {}
        self._placed: dict[str, str] = {}  # session -> worker name
        self._last_call: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.started = time.time()
        self.moves = 0  # sessions moved off a dead worker
        self.refresh(wait_s=600)
        self._monitor = threading.Thread(target=self._watch, name="ray-pool", daemon=True)
        self._monitor.start()

    def runner(self, edge_layers: int) -> RayRunner:
        return RayRunner(self, edge_layers)

    # --- membership -----------------------------------------------------------------------------

    def refresh(self, wait_s: float = 0.0) -> None:
        """Starts ``workers_per_node`` workers on every alive node that lacks them; marks ready ones live."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        with self._lock:
            for w in self._workers.values():
                if w.node_id not in alive:
                    w.live = False
            for node in alive:
                have = sum(1 for w in self._workers.values() if w.node_id == node)
                for i in range(have, self.settings.workers_per_node):
                    name = f"middle-{node[:8]}-{i}"
                    actor = self._actor_class.options(
                        num_cpus=0, max_concurrency=64, max_restarts=-1, max_task_retries=0,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*self._args)
                    self._workers[name] = _Worker(name, node, actor)
            waiting = [w for w in self._workers.values() if not w.live and w.node_id in alive]
            for w in waiting:
                if w.pending is None:
                    w.pending = w.actor.info.remote()
        deadline = time.time() + wait_s
        for w in waiting:
            try:
                w.info = ray.get(w.pending, timeout=max(deadline - time.time(), 0.01))
                w.live, w.pending = True, None
                log.info("ray worker %s ready: %s", w.name, w.info)
            except ray.exceptions.GetTimeoutError:
                pass
            except ray.exceptions.RayError:
                w.pending = None  # died while loading; Ray restarts it, asked again next time

    def worker_for(self, session: str) -> _Worker:
        """The session's worker; a new or moved session goes to the least-loaded live worker."""
        with self._lock:
            self._last_call[session] = time.time()
            name = self._placed.get(session)
            if name is not None and self._workers[name].live:
                return self._workers[name]
            live = [w for w in self._workers.values() if w.live]
            if not live:
                raise Unavailable("no Ray worker of the frozen middle is live; retry in a few seconds")
            load = self._load()
            chosen = min(live, key=lambda w: (load.get(w.name, 0), w.name))
            if name is not None:
                self.moves += 1
                log.warning("session %s moved from %s to %s", session, name, chosen.name)
            self._placed[session] = chosen.name
            return chosen

    def lost(self, worker: _Worker, err: BaseException) -> None:
        """A call to ``worker`` failed because its process died: take it out until Ray restarts it."""
        with self._lock:
            if worker.live:
                log.warning("ray worker %s (pid %s) lost: %s", worker.name, worker.info.get("pid"),
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
            worker.live, worker.failures = False, worker.failures + 1

    def placed(self, session: str) -> _Worker | None:
        """The worker that holds ``session``'s graphs, if it has one and it is live."""
        with self._lock:
            name = self._placed.get(session)
            return self._workers[name] if name is not None and self._workers[name].live else None

    def _load(self) -> dict[str, int]:
        now, load = time.time(), dict[str, int]()
        for session, name in self._placed.items():
            if now - self._last_call.get(session, 0.0) < ACTIVE_S:
                load[name] = load.get(name, 0) + 1
        return load

    # --- the operator's view --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Workers (pid, host, live, sessions, compute seconds, queue wait, batch sizes) and placements."""
        import ray

        with self._lock:
            workers = list(self._workers.values())
            load = self._load()
            placed = dict(self._placed)
        rows = []
        for w in workers:
            stats: Any = None
            if w.live:
                try:
                    stats = ray.get(w.actor.stats.remote(), timeout=5)
                except ray.exceptions.RayError as err:
                    stats = f"unavailable: {type(err).__name__}"
            rows.append({"name": w.name, "node": w.node_id[:12], "live": w.live, "failures": w.failures,
                         "active_sessions": load.get(w.name, 0),
                         "sessions": sorted(s for s, n in placed.items() if n == w.name), **w.info, "stats": stats})
        return {"backbone": "ray", "batch": self.settings.batch, "updated": time.time(),
                "sessions_moved": self.moves, "workers": rows}

    def write_status(self) -> None:
        if self.status_file is None:
            return
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1, default=str))
        tmp.replace(self.status_file)

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            try:
                self.refresh()
                self.write_status()
            except Exception as err:  # noqa: BLE001 - the monitor must outlive one bad poll
                log.warning("ray pool monitor: %s", err)

    def close(self, shutdown: bool) -> None:
        """Stops the monitor and the workers (and the local Ray instance when we started it)."""
        import ray

        self._stop.set()
        self._monitor.join(timeout=10)
        for w in self._workers.values():
            try:
                ray.kill(w.actor, no_restart=True)
            except ray.exceptions.RayError:
                pass
        if shutdown:
            ray.shutdown()


class RayRunner:
    """The backbone seam for edge depth K, on the pool's workers. Handlers cannot tell it from the local one."""

    def __init__(self, pool: RayPool, edge_layers: int) -> None:
        self.pool, self.edge_layers = pool, edge_layers
        self._sites: dict[tuple[str, int], SiteCalls] = {}  # dlora training forwards awaiting their backward
        self._graphs: dict[tuple[str, int], str] = {}  # kept forward -> incarnation of the worker holding it

    def forward(self, session: str, step: int, hidden: torch.Tensor, train: bool,
                sites: SiteCalls | None = None) -> tuple[torch.Tensor, float]:
        spec = None
        if sites is not None:
            live = getattr(sites, "live", [])
            spec = (getattr(sites, "groups", []), sorted(s.index for g in live for s in g.sites))
        call = lambda w: w.actor.forward.remote(session, self.edge_layers, step, hidden, train, spec)  # noqa: E731
        # A forward keeps nothing until it returns, so an evaluation forward moves and reruns at once.
        out, seconds, incarnation = self._converse(session, call, sites, retry=not train and sites is None)
        if train:
            self._graphs[(session, step)] = incarnation
            if sites is not None:
                self._sites[(session, step)] = sites
        return out, seconds

    def backward(self, session: str, step: int, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        sites = self._sites.pop((session, step), None)
        incarnation = self._graphs.pop((session, step), None)
        if incarnation is None:
            raise RunnerError(f"backward for step {step} without its training forward")
        call = lambda w: w.actor.backward.remote(session, self.edge_layers, step, grad, incarnation)  # noqa: E731
        out, seconds, _ = self._converse(session, call, sites, retry=False)
        return out, seconds

    def release(self, session: str) -> int:
        import ray

        for kept in (self._sites, self._graphs):
            for key in [k for k in kept if k[0] == session]:
                del kept[key]
        worker = self.pool.placed(session)
        if worker is None:
            return 0  # never placed, or its worker and graphs are gone already
        try:
            return int(ray.get(worker.actor.release.remote(session), timeout=30))
        except ray.exceptions.RayError:
            return 0

    def _converse(self, session: str, call: Callable[[_Worker], Any], sites: SiteCalls | None,
                  retry: bool) -> tuple[torch.Tensor, float, str]:
        """Runs a step on the session's worker, answering its dlora callouts; (result, seconds, incarnation)."""
        import ray

        from cloud.backbone.ray_worker import GraphLost

        worker = self.pool.worker_for(session)
        try:
            incarnation, outgoing = ray.get(call(worker))
            while isinstance(outgoing, Callout):
                answer = self._ask_edge(worker, session, outgoing, sites)
                incarnation, outgoing = ray.get(worker.actor.answer.remote(session, answer))
        except ray.exceptions.RayActorError as err:
            self.pool.lost(worker, err)
            if retry:
                return self._converse(session, call, sites, retry=False)
            raise Unavailable(f"the Ray worker holding session {session} died mid-step; retry the step (it moves "
                              "to a live worker)") from None
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, GraphLost):
                raise Unavailable(f"session {session}: {cause}; retry the step") from None
            if isinstance(cause, Exception):
                raise cause from None
            raise
        assert isinstance(outgoing, Finished)
        return outgoing.tensor, outgoing.compute_s, incarnation

    def _ask_edge(self, worker: _Worker, session: str, callout: Callout, sites: SiteCalls | None) -> Answer:
        """Answers a worker's dlora site callout through the session's exchange (the edge's stream)."""
        import ray

        live = {g.index: g for g in getattr(sites, "live", [])}
        exchange = getattr(sites, "exchange", None)
        try:
            if exchange is None or callout.site_group not in live:
                raise RunnerError(f"worker asked for site group {callout.site_group}, which this step does not route")
            group = live[callout.site_group]
            if callout.phase is Phase.SITE_INPUT:
                return Answer(Phase.SITE_OUTPUT, group.index, exchange.forward(group, callout.tensor))
            return Answer(Phase.SITE_GRAD_INPUT, group.index, exchange.backward(group, callout.tensor))
        except BaseException:
            worker.actor.abort.remote(session)  # the step waits for an answer that will not come
            ray.get(worker.actor.release.remote(session))
            raise


def run_task(settings: RaySettings, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn(*args)`` as one Ray task on the cluster (retried by Ray if its worker dies) and returns
    its result; an exception ``fn`` raises is raised here as itself."""
    import ray

    started = connect(settings)
    try:
        task = ray.remote(fn).options(num_cpus=0, max_retries=2)
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    finally:
        if started:
            ray.shutdown()


def format_status(status: dict[str, Any]) -> str:
    """The operator's table of :meth:`RayPool.status`: one row per worker and edge depth K."""
    age = time.time() - float(status.get("updated", 0))
    lines = [f"frozen middle on Ray: batching {'on' if status.get('batch') else 'off'}, "
             f"{status.get('sessions_moved', 0)} session move(s) after worker failures, updated {age:.0f} s ago",
             f"{'worker':<22} {'pid':>7} {'host':<12} {'live':<5} {'sess':>4} {'K':>3} {'calls':>6} "
             f"{'compute_s':>10} {'wait_s':>8} {'max_wait':>8}  batch sizes"]
    for w in status.get("workers", []):
        stats = w.get("stats") if isinstance(w.get("stats"), dict) else {}
        head = (f"{w['name']:<22} {w.get('pid', '-')!s:>7} {str(w.get('host', '-'))[:12]:<12} "
                f"{'yes' if w['live'] else 'no':<5} {w['active_sessions']:>4}")
        if not stats:
            lines.append(f"{head} {'-':>3}")
        for k, st in stats.items():
            sizes = ", ".join(f"{n}x{c}" for n, c in st["batch_sizes"].items())
            lines.append(f"{head} {k[2:]:>3} {st['calls']:>6} {st['compute_s']:>10.3f} {st['queue_wait_s']:>8.3f} "
                         f"{st['max_queue_wait_s']:>8.3f}  {sizes}")
    return "\n".join(lines)
