"""The edge's training loop around the modes: recipes, checkpoints, run state and accounting."""
