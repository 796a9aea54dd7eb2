"""Every domain type survives to_proto -> bytes -> from_proto unchanged."""

import pytest

from protocol import edgetune_pb2 as pb
from protocol import serde
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
    TensorChunk,
)

CHUNK = TensorChunk("hidden", "bfloat16", (2, 3, 4), 48, 0, b"\x01" * 48)
FILE = FileChunk("adapter_config.json", 3, 0, b"{}\n", "ab" * 32)
META = AdapterMeta(mode="split", base_model="smollm2-135m", session_id="se-1", adapter_id="ad-1", owner="alice",
                   created="2026-12-01T00:00:00+00:00", size_bytes=10, metrics_json='{"a": 1}')
INFO = ModelInfo("m", "llama", 30, 576, 2, "abc", 123)
OFFSITE_INFO = ModelInfo("m", "llama", 30, 576, 2, "abc", 123, emulator_layers=8, emulator_distilled=True)
UPDATE = AdapterMeta(mode="offsite", base_model="m", owner="bob", job_id="fed-1", round=3, num_examples=1200)

CASES = [
    (CHUNK, serde.tensor_chunk_to_proto, serde.tensor_chunk_from_proto, pb.TensorChunk),
    (FILE, serde.file_chunk_to_proto, serde.file_chunk_from_proto, pb.FileChunk),
    (INFO, serde.model_info_to_proto, serde.model_info_from_proto, pb.ModelInfo),
    (OpenSessionRequest("split", 3), serde.open_session_to_proto, serde.open_session_from_proto, pb.OpenSessionRequest),
    (OpenSessionRequest("offsite", 2, emulator_layers=8), serde.open_session_to_proto, serde.open_session_from_proto,
     pb.OpenSessionRequest),
    (OFFSITE_INFO, serde.model_info_to_proto, serde.model_info_from_proto, pb.ModelInfo),
    (UPDATE, serde.adapter_meta_to_proto, serde.adapter_meta_from_proto, pb.AdapterMeta),
    (RoundRequest(2, 12.5), serde.round_request_to_proto, serde.round_request_from_proto, pb.RoundRequest),
    (RoundTask("fed-1", 2, 3, 40, "ad-9", False, 30.0), serde.round_task_to_proto, serde.round_task_from_proto,
     pb.RoundTask),
    (RoundTask("fed-1", 0, 3, 40, "ad-10", True), serde.round_task_to_proto, serde.round_task_from_proto,
     pb.RoundTask),
    (SessionInfo("se-1", INFO), serde.session_info_to_proto, serde.session_info_from_proto, pb.SessionInfo),
    (OpenSessionRequest("dlora", 2, ("q_proj", "v_proj")), serde.open_session_to_proto,
     serde.open_session_from_proto, pb.OpenSessionRequest),
    (SessionInfo("se-2", INFO, ("model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj")),
     serde.session_info_to_proto, serde.session_info_from_proto, pb.SessionInfo),
    (EdgeMessage("se-1", 8, Phase.FORWARD_TRAIN, CHUNK, active_sites=(0, 3, 5)), serde.edge_message_to_proto,
     serde.edge_message_from_proto, pb.EdgeMessage),
    (EdgeMessage("se-1", 8, Phase.SITE_GRAD_INPUT, CHUNK, site_group=4), serde.edge_message_to_proto,
     serde.edge_message_from_proto, pb.EdgeMessage),
    (CloudMessage(8, Phase.SITE_INPUT, CHUNK, 0.0, site_group=11), serde.cloud_message_to_proto,
     serde.cloud_message_from_proto, pb.CloudMessage),
    (EdgeMessage("se-1", 7, Phase.BACKWARD, CHUNK), serde.edge_message_to_proto, serde.edge_message_from_proto,
     pb.EdgeMessage),
    (EdgeMessage("se-1", 7, Phase.FORWARD_EVAL), serde.edge_message_to_proto, serde.edge_message_from_proto,
     pb.EdgeMessage),
    (CloudMessage(7, Phase.GRADIENT, CHUNK, 0.25), serde.cloud_message_to_proto, serde.cloud_message_from_proto,
     pb.CloudMessage),
    (META, serde.adapter_meta_to_proto, serde.adapter_meta_from_proto, pb.AdapterMeta),
    (AdapterUpload(meta=META), serde.adapter_upload_to_proto, serde.adapter_upload_from_proto, pb.AdapterUpload),
    (AdapterUpload(file=FILE), serde.adapter_upload_to_proto, serde.adapter_upload_from_proto, pb.AdapterUpload),
    (AdapterList([META, META]), serde.adapter_list_to_proto, serde.adapter_list_from_proto, pb.ListAdaptersReply),
]


@pytest.mark.parametrize("value, to_proto, from_proto, message", CASES, ids=lambda c: type(c).__name__)
def test_round_trip(value, to_proto, from_proto, message):
    wire = to_proto(value).SerializeToString()
    assert from_proto(message.FromString(wire)) == value


def test_unknown_phase_is_a_wire_format_error():
    with pytest.raises(serde.WireFormatError, match="unknown phase 99"):
        serde.edge_message_from_proto(pb.EdgeMessage(session_id="s", phase=99))
