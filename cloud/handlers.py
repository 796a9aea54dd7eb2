"""The coordinator's handlers: domain logic behind the gRPC servicer, with injected state.

Handlers take the caller's verified identity and domain values, and raise :mod:`cloud.errors`;
they know nothing of gRPC.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from cloud.backbone import LocalBackbone
from cloud.conversation import Answer, Callout, CalloutFn, Conversation, Finished
from cloud.dlora import DloraBackbone, EdgeSiteExchange
from cloud.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cloud.registry import ADAPTER_FILES, AdapterRegistry, staging_dir
from cloud.sessions import Session, SessionLog, SessionManager
from cloud.vault import CorruptArtifactError
from emulator.arch import arch_for, hidden_size
from emulator.bundle import bundle_files, bundle_id, write_bundle
from emulator.remote_sites import RemoteSiteError, SiteGroup, flatten, plan_remote_sites
from emulator.segments import BlockStack, SplitError, SplitPlan, extract_middle, plan_for
from protocol.serde import WireFormatError
from protocol.tensors import TensorAssembler, bytes_chunks, file_chunks, receive_files, tensor_chunks
from protocol.types import (
    AdapterList,
    AdapterMeta,
    AdapterUpload,
    CloudMessage,
    EdgeMessage,
    FileChunk,
    ModelInfo,
    OpenSessionRequest,
    Phase,
    SessionInfo,
)

MODES = ("split", "dlora")


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
    runner: LocalBackbone


class Coordinator:
    """State and handlers of one coordinator process.

    Args:
        model_name: what ``--model`` said (recorded as the adapters' base model).
        model_dir: local HF directory of the model (tokenizer files come from here).
        model: the full frozen model; only its middle blocks ever run here.
        store: directory for bundles, adapters and the registry.
        default_edge_layers: K when a session does not ask for one.
    """

    def __init__(self, model_name: str, model_dir: Path, model: PreTrainedModel, store: Path,
                 default_edge_layers: int = 2, limits: Limits | None = None) -> None:
        self.model_name, self.model_dir, self.model, self.store = model_name, model_dir, model, store
        self.default_edge_layers = default_edge_layers
        self.limits = limits or Limits()
        self._streams: dict[str, int] = {}
        self._streams_lock = threading.Lock()
        self.sessions = SessionManager()
        self.registry = AdapterRegistry(store)  # creates the store directory
        self.session_log = SessionLog(store / "sessions.sqlite")
        self._backends: dict[int, SplitBackend] = {}
        self._backend_lock = threading.Lock()
        self.backend(default_edge_layers)  # fail at start-up, not at the first client, on a bad K

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
                runner = LocalBackbone(extract_middle(self.model, plan))
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
        backend = self.backend(request.edge_layers or self.default_edge_layers)
        plan = plan_for(self.model.config, backend.info.edge_layers)
        if request.mode == "dlora":
            groups = self._remote_sites(plan, request.lora_targets)
            names = tuple(site.name for site in flatten(groups))
            assert isinstance(backend.runner.segment, BlockStack)
            runner = DloraBackbone(backend.runner.segment, groups)
            session = self.sessions.open(owner, request.mode, plan, runner, names, session_id)
            return SessionInfo(session.session_id, backend.info, names)
        session = self.sessions.open(owner, request.mode, plan, backend.runner, session_id=session_id)
        return SessionInfo(session.session_id, backend.info)

    def _remote_sites(self, plan: SplitPlan, targets: tuple[str, ...]) -> list[SiteGroup]:
        spec = arch_for(self.model.config)
        targets = spec.all_linear if targets == ("all",) else (targets or spec.lora_targets)
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
        for backend in list(self._backends.values()):
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

    def _advance(self, session: Session, conversation: Conversation, head: EdgeMessage,
                 tensor: torch.Tensor) -> Callout | Finished:
        """Starts a step's job, or hands the edge's site answer to the waiting one."""
        if head.phase in (Phase.SITE_OUTPUT, Phase.SITE_GRAD_INPUT):
            return conversation.answer(Answer(head.phase, head.site_group, tensor))
        if head.phase not in (Phase.FORWARD_TRAIN, Phase.FORWARD_EVAL, Phase.BACKWARD):
            raise InvalidArgument(f"phase {head.phase.name} is not sent by an edge")
        outgoing = conversation.start(lambda callout: self._step(session, head, tensor, callout))
        if isinstance(outgoing, Finished):
            session.compute_s += outgoing.compute_s
        return outgoing

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
              callout: CalloutFn) -> tuple[Phase, str, torch.Tensor]:
        """One step's compute (in the conversation's worker thread): returns the reply to the edge."""
        with session.lock:
            if head.phase is Phase.BACKWARD:
                return Phase.GRADIENT, "grad_down", self._backward(session, head.step, tensor)
            self._check_hidden(tensor, head.step)
            train = head.phase is Phase.FORWARD_TRAIN
            runner = session.runner
            if isinstance(runner, DloraBackbone):
                active = runner.check_active(head.active_sites, head.step)
                out, pending, _ = runner.forward(tensor, train, active, EdgeSiteExchange(callout, head.step))
            else:
                out, pending, _ = runner.forward(tensor, keep_graph=train)
            session.pending_step, session.pending = (head.step, pending) if train else (None, None)
            return Phase.ACTIVATION, "hidden_up", out

    def _backward(self, session: Session, step: int, grad: torch.Tensor) -> torch.Tensor:
        pending = session.pending
        if pending is None or session.pending_step != step:
            raise FailedPrecondition(f"backward for step {step} without its training forward")
        if tuple(grad.shape) != tuple(pending.outputs.shape):
            raise InvalidArgument(f"step {step}: gradient shape {tuple(grad.shape)} does not "
                                  f"match the activation {tuple(pending.outputs.shape)}")
        self._check_finite(grad, step)
        session.pending_step, session.pending = None, None
        out, _ = session.runner.backward(pending, grad)
        session.steps += 1
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
            receive_files(files, staged, allowed=set(ADAPTER_FILES))
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
        for name in ADAPTER_FILES:
            yield from bytes_chunks(name, files[name])
