"""The coordinator's handlers: domain logic behind the gRPC servicer, with injected state.

Handlers take the caller's verified identity and domain values, and raise :mod:`cloud.errors`;
they know nothing of gRPC.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from cloud.backbone import LocalBackbone
from cloud.emulators import EmulatorSpec, EmulatorStore, StoredEmulator, default_emulator_layers, model_fingerprint
from cloud.errors import FailedPrecondition, InvalidArgument, NotFound
from cloud.federated import FederatedJob, FederatedSettings, initial_lora_adapter
from cloud.registry import ALLOWED_FILES, AdapterRegistry, adapter_files, staging_dir
from cloud.sessions import Session, SessionManager
from emulator.arch import hidden_size
from emulator.bundle import bundle_files, bundle_id, write_bundle
from emulator.compress import EmulatorError
from emulator.plugin import check_fits
from emulator.segments import SplitError, extract_middle, plan_for
from protocol.serde import WireFormatError
from protocol.tensors import TensorAssembler, file_chunks, receive_files, tensor_chunks
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
    RoundRequest,
    RoundTask,
    SessionInfo,
)

MODES = ("split", "offsite")
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024


@dataclass
class SplitBackend:
    """Everything the cloud prepared for one edge depth K."""

    info: ModelInfo
    bundle_dir: Path
    runner: LocalBackbone


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
    """

    def __init__(self, model_name: str, model_dir: Path, model: PreTrainedModel, store: Path,
                 default_edge_layers: int = 2, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
                 default_emulator_layers: int = 0, federation: FederatedSettings | None = None) -> None:
        self.model_name, self.model_dir, self.model, self.store = model_name, model_dir, model, store
        self.default_edge_layers = default_edge_layers
        self.default_emulator_layers = default_emulator_layers
        self.max_tensor_bytes = max_tensor_bytes
        self.sessions = SessionManager()
        self.registry = AdapterRegistry(store)
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
                runner = LocalBackbone(extract_middle(self.model, plan))
                self._backends[edge_layers] = SplitBackend(info, bundle_dir, runner)
            return self._backends[edge_layers]

    def open_session(self, owner: str, request: OpenSessionRequest) -> SessionInfo:
        if request.mode not in MODES:
            raise InvalidArgument(f"mode {request.mode!r} is not served here (served: {', '.join(MODES)})")
        if request.mode == "offsite":
            offsite = self.offsite_backend(request.edge_layers or self.default_edge_layers, request.emulator_layers)
            plan = plan_for(self.model.config, offsite.info.edge_layers)
            return SessionInfo(self.sessions.open(owner, "offsite", plan, None).session_id, offsite.info)
        backend = self.backend(request.edge_layers or self.default_edge_layers)
        plan = plan_for(self.model.config, backend.info.edge_layers)
        session = self.sessions.open(owner, request.mode, plan, backend.runner)
        return SessionInfo(session.session_id, backend.info)

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
        """Serves one training stream: forward and backward through the middle, step by step."""
        session: Session | None = None
        assembler = TensorAssembler(self.max_tensor_bytes)
        for message in messages:
            if session is None:
                session = self.sessions.get(owner, message.session_id)
                if session.runner is None:
                    raise FailedPrecondition(f"session {session.session_id} is an offsite session: it trains on "
                                             "the edge; open a split session for split inference")
            elif message.session_id != session.session_id:
                raise InvalidArgument("a training stream serves one session; open a new stream")
            if message.tensor is None:
                raise InvalidArgument(f"step {message.step}: message carries no tensor")
            try:
                tensor = assembler.feed(message.tensor)
            except WireFormatError as err:
                raise InvalidArgument(f"step {message.step}: {err}") from None
            if tensor is not None:
                yield from self._step(session, message, tensor)

    def _step(self, session: Session, message: EdgeMessage, tensor: torch.Tensor) -> Iterator[CloudMessage]:
        assert message.tensor is not None
        wire_dtype = message.tensor.dtype
        with session.lock:
            if message.phase in (Phase.FORWARD_TRAIN, Phase.FORWARD_EVAL):
                self._check_hidden(tensor, message.step)
                train = message.phase is Phase.FORWARD_TRAIN
                assert session.runner is not None
                out, pending, compute_s = session.runner.forward(tensor, keep_graph=train)
                session.pending_step, session.pending = (message.step, pending) if train else (None, None)
                reply_phase, name = Phase.ACTIVATION, "hidden_up"
            elif message.phase is Phase.BACKWARD:
                if session.pending is None or session.pending_step != message.step:
                    raise FailedPrecondition(f"backward for step {message.step} without its training forward")
                if tuple(tensor.shape) != tuple(session.pending.outputs.shape):
                    raise InvalidArgument(f"step {message.step}: gradient shape {tuple(tensor.shape)} does not "
                                          f"match the activation {tuple(session.pending.outputs.shape)}")
                self._check_finite(tensor, message.step)
                assert session.runner is not None
                out, compute_s = session.runner.backward(session.pending, tensor)
                session.pending_step, session.pending = None, None
                session.steps += 1
                reply_phase, name = Phase.GRADIENT, "grad_down"
            else:
                raise InvalidArgument(f"phase {message.phase.name} is not sent by an edge")
            session.compute_s += compute_s
        chunks = list(tensor_chunks(name, out, wire_dtype))
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            yield CloudMessage(message.step, reply_phase, chunk, compute_s if last else 0.0)

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
        _, directory = self.registry.get(owner, adapter_id)
        for name in adapter_files(directory):
            yield from file_chunks(directory / name)

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
                stored = self.emulators.find(fingerprint, edge_layers, depth)
                if stored is None:
                    try:
                        stored = self.emulators.build(self.model, self.model_name, fingerprint,
                                                      EmulatorSpec(edge_layers, depth), progress=False)
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
