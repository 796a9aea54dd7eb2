"""The model owner's coordinator: RPC, storage, the frozen backbone and the owner's own jobs."""
