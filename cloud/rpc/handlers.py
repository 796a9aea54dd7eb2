"""The coordinator's handlers: domain logic behind the gRPC servicer, with injected state.

Handlers take the caller's verified identity and domain values, and raise :mod:`cloud.errors`;
they know nothing of gRPC.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from cloud.backbone.conversation import Answer, Callout, CalloutFn, Conversation, Finished
from cloud.backbone.dlora import SessionSites
from cloud.backbone.seam import BackboneRunner, RunnerError, local_runner
from cloud.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cloud.owner.federated import FederatedJob, FederatedSettings, initial_lora_adapter
from cloud.rpc.sessions import Session, SessionLog, SessionManager
from cloud.store.emulators import (
    EmulatorStore,
    StoredEmulator,
    default_emulator_layers,
    default_spec,
    model_fingerprint,
)
from cloud.store.registry import ALLOWED_FILES, AdapterRegistry, staging_dir
from cloud.store.vault import CorruptArtifactError
from emulator.adapters.peft_names import resolve_targets
from emulator.adapters.plugin import check_fits
from emulator.adapters.remote_sites import RemoteSiteError, SiteGroup, flatten, plan_remote_sites
from emulator.model.arch import arch_for, hidden_size
from emulator.model.bundle import bundle_files, bundle_id, write_bundle
from emulator.model.loading import load_tokenizer
from emulator.model.segments import SplitError, SplitPlan, extract_middle, plan_for
from emulator.offsite.compress import EmulatorError
from protocol.serde import WireFormatError
from protocol.tensors import TensorAssembler, bytes_chunks, file_chunks, receive_files, tensor_chunks
from protocol.types import (
    MODES,
    AdapterList,
    AdapterMeta,
    AdapterUpload,
    CloudMessage,
    EdgeMessage,
    FileChunk,
    ModelInfo,
    OpenSessionRequest,
    Phase,
    RoundRequest,
    RoundTask,
    SessionInfo,
)


@dataclass(frozen=True)
class Limits:
    """Per-client limits (``serve --max-streams-per-client --max-tensor-mb --idle-timeout``)."""

    max_streams_per_client: int = 4
    max_tensor_bytes: int = 256 * 1024 * 1024
    idle_timeout_s: float = 300.0


@dataclass
class SplitBackend:
    """Everything the cloud prepared for one edge depth K."""

    info: ModelInfo
    bundle_dir: Path
    runner: BackboneRunner


@dataclass
class OffsiteBackend:
    """What the cloud prepared for one (K, E): the offsite bundle and the emulator inside it."""

    info: ModelInfo
    bundle_dir: Path
    emulator: StoredEmulator


class Coordinator:
    """State and handlers of one coordinator process.

    Args:
        model_name: what ``--model`` said (recorded as the adapters' base model).
        model_dir: local HF directory of the model (tokenizer files come from here).
        model: the full frozen model; only its middle blocks ever run here.
        store: directory for bundles, adapters and the registry.
        default_edge_layers: K when a session does not ask for one.
        default_emulator_layers: offsite emulator depth E when a session does not ask (0: a third of
            the middle).
        federation: run one FedAvg job over offsite adapters (``None``: no federated rounds).
        backbone_dtype: dtype the frozen middle runs in (tensors still cross the wire as the edge asks).
        runner_factory: ``K -> runner`` for the middle elsewhere (``serve --backbone ray``); ``None``: the
            middle runs in this process.
    """

    def __init__(self, model_name: str, model_dir: Path, model: PreTrainedModel, store: Path,
                 default_edge_layers: int = 2, limits: Limits | None = None, default_emulator_layers: int = 0,
                 federation: FederatedSettings | None = None, backbone_dtype: torch.dtype = torch.float32,
                 runner_factory: Callable[[int], BackboneRunner] | None = None) -> None:
        self.backbone_dtype = backbone_dtype
        self.runner_factory = runner_factory
        self.model_name, self.model_dir, self.model, self.store = model_name, model_dir, model, store
        self.default_edge_layers = default_edge_layers
        self.default_emulator_layers = default_emulator_layers
        self.limits = limits or Limits()
        self._streams: dict[str, int] = {}
        self._streams_lock = threading.Lock()
        self.sessions = SessionManager(self.limits.idle_timeout_s)
        self.sessions.start_reaper(min(self.limits.idle_timeout_s / 2, 60.0))
        self.registry = AdapterRegistry(store)  # creates the store directory
        self.session_log = SessionLog(store / "sessions.sqlite")
        self.emulators = EmulatorStore(store)
        self._backends: dict[int, SplitBackend] = {}
        self._offsite: dict[tuple[int, int], OffsiteBackend] = {}
        self._backend_lock = threading.Lock()
        self.backend(default_edge_layers)  # fail at start-up, not at the first client, on a bad K
        self.job = self._start_job(federation) if federation is not None else None

    def backend(self, edge_layers: int) -> SplitBackend:
        """The bundle and middle runner for K edge layers, built on first use."""
        with self._backend_lock:
            if edge_layers not in self._backends:
                try:
                    plan = plan_for(self.model.config, edge_layers)
                except SplitError as err:
                    raise InvalidArgument(str(err)) from None
                bundle_dir = write_bundle(self.model, self.model_dir, plan, self.store / "bundles",
                                          self.model_name)
                info = ModelInfo(self.model_name, self.model.config.model_type, plan.n_blocks,
                                 hidden_size(self.model.config), edge_layers, bundle_id(bundle_dir),
                                 sum(p.stat().st_size for p in bundle_files(bundle_dir)))
                if self.runner_factory is not None:
                    runner = self.runner_factory(edge_layers)
                else:
                    runner = local_runner(extract_middle(self.model, plan), self.backbone_dtype)
                self._backends[edge_layers] = SplitBackend(info, bundle_dir, runner)
            return self._backends[edge_layers]

    def open_session(self, owner: str, request: OpenSessionRequest) -> SessionInfo:
        info = self._open(owner, request)
        self.session_log.record(info.session_id, owner, dataclasses.asdict(request))
        return info

    def session(self, owner: str, session_id: str) -> Session:
        """A session of ``owner``; one opened before a restart is rebuilt from the session log."""
        if self.sessions.find(session_id) is None:
            logged = self.session_log.lookup(session_id)
            if logged is not None and logged[0] == owner:
                fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in logged[1].items()}
                request = OpenSessionRequest(**fields)
                self._open(owner, request, session_id)
        return self.sessions.get(owner, session_id)

    def _open(self, owner: str, request: OpenSessionRequest, session_id: str | None = None) -> SessionInfo:
        if request.mode not in MODES:
            raise InvalidArgument(f"mode {request.mode!r} is not served here (served: {', '.join(MODES)})")
        if request.mode == "offsite":
            offsite = self.offsite_backend(request.edge_layers or self.default_edge_layers, request.emulator_layers)
            plan = plan_for(self.model.config, offsite.info.edge_layers)
            session = self.sessions.open(owner, "offsite", plan, None, session_id=session_id)
            return SessionInfo(session.session_id, offsite.info)
        backend = self.backend(request.edge_layers or self.default_edge_layers)
        plan = plan_for(self.model.config, backend.info.edge_layers)
        if request.mode == "dlora":
            groups = self._remote_sites(plan, request.lora_targets)
            names = tuple(site.name for site in flatten(groups))
            session = self.sessions.open(owner, request.mode, plan, backend.runner, names, session_id,
                                         SessionSites(groups))
            return SessionInfo(session.session_id, backend.info, names)
        session = self.sessions.open(owner, request.mode, plan, backend.runner, session_id=session_id)
        return SessionInfo(session.session_id, backend.info)

    def _remote_sites(self, plan: SplitPlan, targets: tuple[str, ...]) -> list[SiteGroup]:
        spec = arch_for(self.model.config)
        targets = resolve_targets(targets, spec)
        unknown = sorted(set(targets) - set(spec.all_linear))
        if unknown:
            raise InvalidArgument(f"LoRA targets {unknown} are not projections of {self.model.config.model_type} "
                                  f"blocks (choose from {', '.join(spec.all_linear)})")
        try:
            return plan_remote_sites(self.model, plan, targets)
        except RemoteSiteError as err:
            raise InvalidArgument(str(err)) from None

    def fetch_bundle(self, owner: str, wanted: str) -> Iterator[FileChunk]:
        """Streams the bundle files; any authenticated client may fetch a bundle."""
        backends: list[SplitBackend | OffsiteBackend] = [*self._backends.values(), *self._offsite.values()]
        for backend in backends:
            if backend.info.bundle_id == wanted:
                for path in bundle_files(backend.bundle_dir):
                    yield from file_chunks(path)
                return
        raise NotFound(f"no bundle {wanted!r}; open a session to learn the current bundle id")

    def train(self, owner: str, messages: Iterable[EdgeMessage]) -> Iterator[CloudMessage]:
        """Serves one training stream: forward and backward through the middle, step by step.

        In dlora mode a step's forward and backward call out to the edge for every active site group
        (``SITE_INPUT`` -> ``SITE_OUTPUT``, ``SITE_GRAD_OUTPUT`` -> ``SITE_GRAD_INPUT``) before the
        step's reply; the compute runs in a :class:`Conversation` worker so it can wait mid-forward.
        """
        with self._stream_slot(owner):
            yield from self._train(owner, messages)

    @contextmanager
    def _stream_slot(self, owner: str) -> Iterator[None]:
        with self._streams_lock:
            if self._streams.get(owner, 0) >= self.limits.max_streams_per_client:
                raise ResourceExhausted(f"identity {owner!r} already has {self.limits.max_streams_per_client} "
                                        "training streams open; close one or wait")
            self._streams[owner] = self._streams.get(owner, 0) + 1
        try:
            yield
        finally:
            with self._streams_lock:
                self._streams[owner] -= 1

    def _train(self, owner: str, messages: Iterable[EdgeMessage]) -> Iterator[CloudMessage]:
        session: Session | None = None
        assembler = TensorAssembler(self.limits.max_tensor_bytes)
        conversation, head = Conversation(), None
        try:
            for message in messages:
                if session is None:
                    session = self.session(owner, message.session_id)
                    if session.runner is None:
                        raise FailedPrecondition(f"session {session.session_id} is an offsite session: it trains "
                                                 "on the edge; open a split session for split inference")
                elif message.session_id != session.session_id:
                    raise InvalidArgument("a training stream serves one session; open a new stream")
                if message.tensor is None:
                    raise InvalidArgument(f"step {message.step}: message carries no tensor")
                head = message if message.tensor.offset == 0 else head
                try:
                    tensor = assembler.feed(message.tensor)
                except WireFormatError as err:
                    raise InvalidArgument(f"step {message.step}: {err}") from None
                if tensor is not None:
                    assert head is not None
                    yield from self._reply(head, self._advance(session, conversation, head, tensor))
        finally:
            conversation.close()
            if session is not None:
                self._release(session)

    @staticmethod
    def _release(session: Session) -> None:
        """Frees the graphs the runner keeps for ``session`` (a stream closed between forward and backward)."""
        with session.lock:
            if session.runner is not None and session.pending_step is not None:
                session.runner.release(session.session_id)
            session.pending_step = None

    def _advance(self, session: Session, conversation: Conversation, head: EdgeMessage,
                 tensor: torch.Tensor) -> Callout | Finished:
        """Starts a step's job, or hands the edge's site answer to the waiting one."""
        if head.phase in (Phase.SITE_OUTPUT, Phase.SITE_GRAD_INPUT):
            return conversation.answer(Answer(head.phase, head.site_group, tensor))
        if head.phase not in (Phase.FORWARD_TRAIN, Phase.FORWARD_EVAL, Phase.BACKWARD):
            raise InvalidArgument(f"phase {head.phase.name} is not sent by an edge")
        return conversation.start(lambda callout: self._step(session, head, tensor, callout))

    def _reply(self, head: EdgeMessage, outgoing: Callout | Finished) -> Iterator[CloudMessage]:
        assert head.tensor is not None
        if isinstance(outgoing, Callout):
            name, compute_s, phase, group = "site", 0.0, outgoing.phase, outgoing.site_group
        else:
            name, compute_s, phase, group = outgoing.name, outgoing.compute_s, outgoing.phase, 0
        chunks = list(tensor_chunks(name, outgoing.tensor, head.tensor.dtype))
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            yield CloudMessage(head.step, phase, chunk, compute_s if last else 0.0, group)

    def _step(self, session: Session, head: EdgeMessage, tensor: torch.Tensor,
              callout: CalloutFn) -> tuple[Phase, str, torch.Tensor, float]:
        """One step's compute (in the conversation's worker thread): the reply to the edge and the
        runner's compute seconds (recorded in the session's stats)."""
        with session.lock:
            runner = session.runner
            assert runner is not None  # offsite sessions are refused when their stream opens
            session.touch()
            if head.phase is Phase.BACKWARD:
                out, compute_s = self._backward(session, runner, head.step, tensor)
                session.record_compute(compute_s, step_done=True)
                return Phase.GRADIENT, "grad_down", out, compute_s
            self._check_hidden(tensor, head.step)
            train = head.phase is Phase.FORWARD_TRAIN
            sites = session.sites.calls(head.active_sites, head.step, callout) if session.sites else None
            if session.pending_step is not None:  # a forward replaces the one left without its backward
                runner.release(session.session_id)
                session.pending_step = None
            out, compute_s = runner.forward(session.session_id, head.step, tensor, train, sites)
            session.pending_step = head.step if train else None
            session.record_compute(compute_s)
            return Phase.ACTIVATION, "hidden_up", out, compute_s

    def _backward(self, session: Session, runner: BackboneRunner, step: int,
                  grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        if session.pending_step != step:
            raise FailedPrecondition(f"backward for step {step} without its training forward")
        self._check_finite(grad, step)
        try:
            out = runner.backward(session.session_id, step, grad)
        except RunnerError as err:
            raise InvalidArgument(str(err)) from None
        session.pending_step = None
        return out

    def _check_hidden(self, tensor: torch.Tensor, step: int) -> None:
        hidden = hidden_size(self.model.config)
        max_len = getattr(self.model.config, "max_position_embeddings", None) or self.model.config.n_positions
        if tensor.dim() != 3 or tensor.shape[-1] != hidden:
            raise InvalidArgument(f"step {step}: hidden states must be (batch, seq, {hidden}), "
                                  f"got {tuple(tensor.shape)}")
        if tensor.shape[1] > max_len or tensor.shape[0] == 0 or tensor.shape[1] == 0:
            raise InvalidArgument(f"step {step}: sequence length {tensor.shape[1]} outside 1..{max_len}")
        self._check_finite(tensor, step)

    @staticmethod
    def _check_finite(tensor: torch.Tensor, step: int) -> None:
        if not torch.isfinite(tensor).all():
            raise InvalidArgument(f"step {step}: tensor contains NaN or Inf; lower the learning rate "
                                  "or enable gradient clipping")

    def register_adapter(self, owner: str, uploads: Iterable[AdapterUpload]) -> AdapterMeta:
        stream = iter(uploads)
        first = next(stream, None)
        if first is None or first.meta is None:
            raise InvalidArgument("an adapter upload starts with its metadata")
        staged = staging_dir(self.store)
        try:
            files = (u.file for u in stream if u.file is not None)
            receive_files(files, staged, allowed=set(ALLOWED_FILES))
            if first.meta.mode == "offsite":
                self._check_plug_in(staged)
            return self.registry.add(owner, first.meta, staged)
        except WireFormatError as err:
            raise InvalidArgument(str(err)) from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def list_adapters(self, owner: str) -> AdapterList:
        return AdapterList(self.registry.list(owner))

    def pull_adapter(self, owner: str, adapter_id: str) -> Iterator[FileChunk]:
        try:
            _, files = self.registry.get(owner, adapter_id)
        except CorruptArtifactError as err:
            raise DataLoss(str(err)) from None
        for name, data in files.items():
            yield from bytes_chunks(name, data)

    # --- offsite mode -------------------------------------------------------------------------

    def offsite_backend(self, edge_layers: int, emulator_layers: int = 0) -> OffsiteBackend:
        """The offsite bundle for (K, E): a stored emulator (distilled preferred) or, if none, a
        layer-drop-only one built now and stored."""
        try:
            plan = plan_for(self.model.config, edge_layers)
        except SplitError as err:
            raise InvalidArgument(str(err)) from None
        depth = emulator_layers or self.default_emulator_layers or default_emulator_layers(len(plan.middle))
        with self._backend_lock:
            if (edge_layers, depth) not in self._offsite:
                fingerprint = model_fingerprint(self.model_dir)
                spec = default_spec(edge_layers, len(plan.middle), depth)
                tokenizer = load_tokenizer(self.model_dir) if spec.uses_corpus else None
                try:
                    stored = self.emulators.serving(self.model, self.model_name, fingerprint, spec, tokenizer)
                except EmulatorError as err:
                    raise InvalidArgument(str(err)) from None
                bundle_dir = write_bundle(self.model, self.model_dir, plan, self.store / "bundles", self.model_name,
                                          stored.load(self.model), stored.public_meta())
                info = ModelInfo(self.model_name, self.model.config.model_type, plan.n_blocks,
                                 hidden_size(self.model.config), edge_layers, bundle_id(bundle_dir),
                                 sum(p.stat().st_size for p in bundle_files(bundle_dir)), depth, stored.distilled)
                self._offsite[(edge_layers, depth)] = OffsiteBackend(info, bundle_dir, stored)
            return self._offsite[(edge_layers, depth)]

    def _check_plug_in(self, staged: Path) -> None:
        """An offsite adapter must plug into the full model: every tensor has a home of its shape."""
        try:
            check_fits(self.model, staged)
        except (ValueError, FileNotFoundError) as err:
            raise InvalidArgument(f"adapter does not plug into {self.model_name}: {err}") from None

    # --- federated rounds ----------------------------------------------------------------------

    def _start_job(self, settings: FederatedSettings) -> FederatedJob:
        job_id = "fed-" + uuid.uuid4().hex[:10]
        workdir = self.store / "federated" / job_id
        initial = initial_lora_adapter(self.model, self.default_edge_layers, settings.lora, self.model_name,
                                       workdir / "round-0", settings.seed)
        owner = f"federation:{job_id}"

        def publish(directory: Path, number: int, final: bool) -> str:
            meta = AdapterMeta(mode="offsite", base_model=self.model_name, job_id=job_id, round=number,
                               metrics_json=json.dumps({"fedavg_round": number, "final": final}))
            return self.registry.add(owner, meta, directory).adapter_id

        return FederatedJob(job_id, settings, workdir, initial, publish, self.registry.grant)

    def _job(self) -> FederatedJob:
        if self.job is None:
            raise FailedPrecondition("this coordinator runs no federated job; start it with "
                                     "`edgetune-cloud serve --rounds R --clients-per-round C`")
        return self.job

    def next_round(self, owner: str, request: RoundRequest) -> RoundTask:
        return self._job().next_round(owner, request.after_round, min(request.wait_s, 300.0))

    def submit_update(self, owner: str, uploads: Iterable[AdapterUpload]) -> AdapterMeta:
        job = self._job()
        stream = iter(uploads)
        first = next(stream, None)
        if first is None or first.meta is None:
            raise InvalidArgument("an update starts with its metadata (job_id, round, num_examples)")
        staged = staging_dir(self.store)
        try:
            receive_files((u.file for u in stream if u.file is not None), staged, allowed=set(ALLOWED_FILES))
            self._check_plug_in(staged)
            return job.submit(owner, replace(first.meta, owner=owner), staged)
        except WireFormatError as err:
            raise InvalidArgument(str(err)) from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)
