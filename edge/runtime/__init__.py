"""On-device inference without PyTorch: export the LoRA-merged edge segments to ONNX, predict on onnxruntime."""
