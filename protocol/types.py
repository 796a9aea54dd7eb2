"""Domain types of the wire protocol. Plain dataclasses: nothing here imports generated code.

``protocol.serde`` converts each of them to and from its protobuf message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

MODES = ("split", "dlora", "offsite")  # the training modes an edge may open a session in


class Phase(IntEnum):
    """What a training-stream message carries (values match the ``Phase`` enum on the wire)."""

    FORWARD_TRAIN = 1
    FORWARD_EVAL = 2
    BACKWARD = 3
    ACTIVATION = 4
    GRADIENT = 5
    SITE_INPUT = 6  # dlora: cloud -> edge, input of one block's active LoRA sites
    SITE_OUTPUT = 7  # dlora: edge -> cloud, their LoRA outputs (concatenated)
    SITE_GRAD_OUTPUT = 8  # dlora: cloud -> edge, gradient w.r.t. those outputs
    SITE_GRAD_INPUT = 9  # dlora: edge -> cloud, gradient w.r.t. the sites' input


@dataclass(frozen=True)
class TensorChunk:
    """One piece of a tensor: ``data`` is ``total_bytes`` long when the tensor fits one chunk."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    total_bytes: int
    offset: int
    data: bytes

    @property
    def is_last(self) -> bool:
        return self.offset + len(self.data) >= self.total_bytes


@dataclass(frozen=True)
class FileChunk:
    """One piece of a file; ``sha256`` of the whole file is set on the last piece."""

    name: str
    total_bytes: int
    offset: int
    data: bytes
    sha256: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What the cloud serves, and the content hash of the edge bundle for this split."""

    model_name: str
    model_type: str
    num_blocks: int
    hidden_size: int
    edge_layers: int
    bundle_id: str
    bundle_bytes: int
    emulator_layers: int = 0  # offsite bundles: blocks in the emulator of the middle
    emulator_distilled: bool = False


@dataclass(frozen=True)
class OpenSessionRequest:
    mode: str
    edge_layers: int = 0  # 0: the server's default
    lora_targets: tuple[str, ...] = ()  # dlora: projection names; empty: the family's default
    emulator_layers: int = 0  # offsite only; 0: the server's default


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: ModelInfo
    remote_sites: tuple[str, ...] = ()  # dlora: cloud-held LoRA sites, indexed by ``active_sites``


@dataclass(frozen=True)
class EdgeMessage:
    """Edge to cloud on the training stream."""

    session_id: str
    step: int
    phase: Phase
    tensor: TensorChunk | None = None
    site_group: int = 0  # SITE_OUTPUT / SITE_GRAD_INPUT: the group answered
    active_sites: tuple[int, ...] = ()  # FORWARD_* in dlora: indices into ``SessionInfo.remote_sites``


@dataclass(frozen=True)
class CloudMessage:
    """Cloud to edge on the training stream; ``compute_s`` is the cloud's compute time."""

    step: int
    phase: Phase
    tensor: TensorChunk | None = None
    compute_s: float = 0.0
    site_group: int = 0  # SITE_INPUT / SITE_GRAD_OUTPUT: the group asking


@dataclass(frozen=True)
class AdapterMeta:
    """A registered adapter. ``adapter_id``, ``owner`` and ``created`` are set by the cloud."""

    mode: str
    base_model: str
    session_id: str = ""
    adapter_id: str = ""
    owner: str = ""
    created: str = ""
    size_bytes: int = 0
    metrics_json: str = "{}"
    job_id: str = ""  # federated updates: the job, round and example count (FedAvg weight)
    round: int = 0
    num_examples: int = 0


@dataclass(frozen=True)
class AdapterUpload:
    """One upload message: the first carries ``meta``, the rest ``file`` chunks."""

    meta: AdapterMeta | None = None
    file: FileChunk | None = None


@dataclass(frozen=True)
class AdapterList:
    adapters: list[AdapterMeta] = field(default_factory=list)


@dataclass(frozen=True)
class RoundRequest:
    """Asks for the next federated round after ``after_round``, waiting up to ``wait_s`` seconds."""

    after_round: int = 0
    wait_s: float = 30.0


@dataclass(frozen=True)
class RoundTask:
    """A federated round for one client; ``round == 0`` and not ``finished`` means: ask again."""

    job_id: str
    round: int = 0
    rounds: int = 0
    local_steps: int = 0
    global_adapter_id: str = ""
    finished: bool = False
    deadline_s: float = 0.0
