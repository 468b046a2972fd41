"""MLflow: a training's runs (params, metrics, plots, artifacts), the pyfunc model that wraps a checkpoint,
and the registry (register, compare champion and challenger, promote)."""
