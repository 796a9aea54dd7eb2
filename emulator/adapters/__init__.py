"""Adapters: LoRA on segments, remote LoRA sites, plug-in, and the Hugging Face PEFT format."""
