"""Traffic accounting: every message the edge sends or receives is counted here.

``bytes`` are application bytes: the serialized protobuf message plus gRPC's 5-byte length prefix.
``payload`` bytes are tensor or file data alone. See docs/accounting.md for the formulas.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GRPC_FRAME_BYTES = 5  # 1 compressed-flag byte + 4 length bytes in front of every gRPC message


@dataclass
class Traffic:
    """Counters of one phase (setup, training, evaluation) or one step."""

    bytes_sent: int = 0
    bytes_received: int = 0
    payload_bytes_sent: int = 0
    payload_bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    round_trips: int = 0

    def sent(self, message_bytes: int, payload_bytes: int) -> None:
        self.bytes_sent += message_bytes + GRPC_FRAME_BYTES
        self.payload_bytes_sent += payload_bytes
        self.messages_sent += 1

    def received(self, message_bytes: int, payload_bytes: int) -> None:
        self.bytes_received += message_bytes + GRPC_FRAME_BYTES
        self.payload_bytes_received += payload_bytes
        self.messages_received += 1

    def add(self, other: Traffic) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {prefix + k: v for k, v in asdict(self).items()}


def payload_size(message) -> int:
    """Tensor or file bytes carried by a generated message (0 when it carries none)."""
    for field in ("tensor", "file"):
        if message.HasField(field) if field in message.DESCRIPTOR.fields_by_name else False:
            return len(getattr(message, field).data)
    data = getattr(message, "data", None)
    return len(data) if isinstance(data, bytes) else 0
