"""MegaContext core: a pure-torch library (no Lightning, Hydra or MLflow imports)."""
