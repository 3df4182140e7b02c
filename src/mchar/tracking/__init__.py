"""MLflow tracking helpers (rank-zero only side effects)."""
