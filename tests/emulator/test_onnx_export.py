"""The edge segments stay exportable: ONNX (dynamo exporter) + onnxruntime match eager PyTorch."""

import onnxruntime as ort
import torch

from emulator.model.segments import split_causal_lm
from tests.tiny_models import tiny_model


def test_edge_segments_export_to_onnx(tmp_path):
    split = split_causal_lm(tiny_model("llama"), 2)
    bottom, top = split.edge.bottom.eval(), split.edge.top.eval()
    ids = torch.randint(1, 96, (2, 7))
    hidden = bottom(ids).detach()
    dims = {0: "batch", 1: "seq"}
    torch.onnx.export(bottom, (ids,), tmp_path / "bottom.onnx", dynamo=True, dynamic_shapes={"input_ids": dims})
    torch.onnx.export(top, (hidden,), tmp_path / "top.onnx", dynamo=True, dynamic_shapes={"hidden": dims})
    other_ids = torch.randint(1, 96, (3, 11))  # other batch and length than at export time
    b = ort.InferenceSession(str(tmp_path / "bottom.onnx"))
    t = ort.InferenceSession(str(tmp_path / "top.onnx"))
    h = b.run(None, {b.get_inputs()[0].name: other_ids.numpy()})[0]
    logits = t.run(None, {t.get_inputs()[0].name: h})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(h), bottom(other_ids), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(logits), top(bottom(other_ids)), rtol=1e-4, atol=1e-5)
