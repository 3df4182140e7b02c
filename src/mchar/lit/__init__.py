"""LightningModules: the base LM, GistNet, LensNet and end-to-end training."""
