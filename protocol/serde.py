"""The one place that converts domain types to and from protobuf messages (``x_to_proto``/``x_from_proto``)."""

from __future__ import annotations

from protocol import edgetune_pb2 as pb
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


class WireFormatError(ValueError):
    """A message that decodes but does not describe a valid domain value."""


def tensor_chunk_to_proto(c: TensorChunk) -> pb.TensorChunk:
    return pb.TensorChunk(name=c.name, dtype=c.dtype, shape=list(c.shape), total_bytes=c.total_bytes,
                          offset=c.offset, data=c.data)


def tensor_chunk_from_proto(m: pb.TensorChunk) -> TensorChunk:
    return TensorChunk(name=m.name, dtype=m.dtype, shape=tuple(m.shape), total_bytes=m.total_bytes,
                       offset=m.offset, data=bytes(m.data))


def file_chunk_to_proto(c: FileChunk) -> pb.FileChunk:
    return pb.FileChunk(name=c.name, total_bytes=c.total_bytes, offset=c.offset, data=c.data,
                        sha256=c.sha256)


def file_chunk_from_proto(m: pb.FileChunk) -> FileChunk:
    return FileChunk(name=m.name, total_bytes=m.total_bytes, offset=m.offset, data=bytes(m.data),
                     sha256=m.sha256)


def model_info_to_proto(i: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(model_name=i.model_name, model_type=i.model_type, num_blocks=i.num_blocks,
                        hidden_size=i.hidden_size, edge_layers=i.edge_layers, bundle_id=i.bundle_id,
                        bundle_bytes=i.bundle_bytes, emulator_layers=i.emulator_layers,
                        emulator_distilled=i.emulator_distilled)


def model_info_from_proto(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(model_name=m.model_name, model_type=m.model_type, num_blocks=m.num_blocks,
                     hidden_size=m.hidden_size, edge_layers=m.edge_layers, bundle_id=m.bundle_id,
                     bundle_bytes=m.bundle_bytes, emulator_layers=m.emulator_layers,
                     emulator_distilled=m.emulator_distilled)


def open_session_to_proto(r: OpenSessionRequest) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(mode=r.mode, edge_layers=r.edge_layers, lora_targets=list(r.lora_targets),
                                 emulator_layers=r.emulator_layers)


def open_session_from_proto(m: pb.OpenSessionRequest) -> OpenSessionRequest:
    return OpenSessionRequest(mode=m.mode, edge_layers=m.edge_layers, lora_targets=tuple(m.lora_targets),
                              emulator_layers=m.emulator_layers)


def session_info_to_proto(s: SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(session_id=s.session_id, model=model_info_to_proto(s.model),
                          remote_sites=list(s.remote_sites))


def session_info_from_proto(m: pb.SessionInfo) -> SessionInfo:
    return SessionInfo(session_id=m.session_id, model=model_info_from_proto(m.model),
                       remote_sites=tuple(m.remote_sites))


def _phase_from_proto(value: int) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        raise WireFormatError(f"unknown phase {value}") from None


def edge_message_to_proto(e: EdgeMessage) -> pb.EdgeMessage:
    msg = pb.EdgeMessage(session_id=e.session_id, step=e.step, phase=e.phase.name, site_group=e.site_group,
                         active_sites=list(e.active_sites))
    if e.tensor is not None:
        msg.tensor.CopyFrom(tensor_chunk_to_proto(e.tensor))
    return msg


def edge_message_from_proto(m: pb.EdgeMessage) -> EdgeMessage:
    tensor = tensor_chunk_from_proto(m.tensor) if m.HasField("tensor") else None
    return EdgeMessage(session_id=m.session_id, step=m.step, phase=_phase_from_proto(m.phase), tensor=tensor,
                       site_group=m.site_group, active_sites=tuple(m.active_sites))


def cloud_message_to_proto(c: CloudMessage) -> pb.CloudMessage:
    msg = pb.CloudMessage(step=c.step, phase=c.phase.name, compute_s=c.compute_s, site_group=c.site_group)
    if c.tensor is not None:
        msg.tensor.CopyFrom(tensor_chunk_to_proto(c.tensor))
    return msg


def cloud_message_from_proto(m: pb.CloudMessage) -> CloudMessage:
    tensor = tensor_chunk_from_proto(m.tensor) if m.HasField("tensor") else None
    return CloudMessage(step=m.step, phase=_phase_from_proto(m.phase), tensor=tensor, compute_s=m.compute_s,
                        site_group=m.site_group)


def adapter_meta_to_proto(a: AdapterMeta) -> pb.AdapterMeta:
    return pb.AdapterMeta(adapter_id=a.adapter_id, owner=a.owner, mode=a.mode, base_model=a.base_model,
                          session_id=a.session_id, created=a.created, size_bytes=a.size_bytes,
                          metrics_json=a.metrics_json, job_id=a.job_id, round=a.round,
                          num_examples=a.num_examples)


def adapter_meta_from_proto(m: pb.AdapterMeta) -> AdapterMeta:
    return AdapterMeta(adapter_id=m.adapter_id, owner=m.owner, mode=m.mode, base_model=m.base_model,
                       session_id=m.session_id, created=m.created, size_bytes=m.size_bytes,
                       metrics_json=m.metrics_json or "{}", job_id=m.job_id, round=m.round,
                       num_examples=m.num_examples)


def adapter_upload_to_proto(u: AdapterUpload) -> pb.AdapterUpload:
    msg = pb.AdapterUpload()
    if u.meta is not None:
        msg.meta.CopyFrom(adapter_meta_to_proto(u.meta))
    if u.file is not None:
        msg.file.CopyFrom(file_chunk_to_proto(u.file))
    return msg


def adapter_upload_from_proto(m: pb.AdapterUpload) -> AdapterUpload:
    return AdapterUpload(
        meta=adapter_meta_from_proto(m.meta) if m.HasField("meta") else None,
        file=file_chunk_from_proto(m.file) if m.HasField("file") else None,
    )


def adapter_list_to_proto(a: AdapterList) -> pb.ListAdaptersReply:
    return pb.ListAdaptersReply(adapters=[adapter_meta_to_proto(x) for x in a.adapters])


def adapter_list_from_proto(m: pb.ListAdaptersReply) -> AdapterList:
    return AdapterList([adapter_meta_from_proto(x) for x in m.adapters])


def round_request_to_proto(r: RoundRequest) -> pb.RoundRequest:
    return pb.RoundRequest(after_round=r.after_round, wait_s=r.wait_s)


def round_request_from_proto(m: pb.RoundRequest) -> RoundRequest:
    return RoundRequest(after_round=m.after_round, wait_s=m.wait_s)


def round_task_to_proto(t: RoundTask) -> pb.RoundTask:
    return pb.RoundTask(job_id=t.job_id, round=t.round, rounds=t.rounds, local_steps=t.local_steps,
                        global_adapter_id=t.global_adapter_id, finished=t.finished, deadline_s=t.deadline_s)


def round_task_from_proto(m: pb.RoundTask) -> RoundTask:
    return RoundTask(job_id=m.job_id, round=m.round, rounds=m.rounds, local_steps=m.local_steps,
                     global_adapter_id=m.global_adapter_id, finished=m.finished, deadline_s=m.deadline_s)
