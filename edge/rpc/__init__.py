"""The edge's typed view of the coordinator over one mutual-TLS channel."""
