"""Evaluation: task accuracy, perplexity at budget, the lm-eval model, focus telemetry."""
