"""Checkpoint I/O: the original's Hugging Face safetensors layout and Orbax."""
