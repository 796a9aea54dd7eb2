"""The three training modes on the edge: split, dlora (with Kill-and-Revive) and offsite."""
