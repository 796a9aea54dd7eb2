"""Jobs the model owner runs on its own data: evaluation of adapters and FedAvg rounds."""
