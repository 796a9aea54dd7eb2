"""Data and scoring: the JSONL dataset format, tokenization, batching and multiple-choice scoring."""
