"""Checkpoint formats beyond HF checkpoint directories and dsjax checkpoints: one module (or
two) per format, each giving a dsjax.sources.Source (gguf.py: llama.cpp's GGUF files)."""
