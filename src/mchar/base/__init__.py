"""Frozen base language models: the HF adapter and the small local LM mchar can train for offline use."""
