"""The model owner's privacy audit: attacks on what an edge sends (states, gradients, adapters)."""
