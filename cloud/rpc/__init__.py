"""The coordinator's gRPC surface: server recipe, thin servicer, handlers, sessions and caller identity."""
