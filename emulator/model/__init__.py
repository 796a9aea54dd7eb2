"""Model surgery: the architecture table, loading, segments and edge bundles."""
