"""mchar: a Lightning/Hydra/Optuna/MLflow harness for MegaContext research on frozen LMs."""

__version__ = "0.1.0"
