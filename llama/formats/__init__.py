"""Checkpoint formats other than Meta's own (which ``llama.checkpoint`` reads and writes)."""
