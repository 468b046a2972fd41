"""Training over an ingested dataset: its loaders, and the config's stages end to end, each an MLflow run,
in one process or on N (`torchrun`)."""
