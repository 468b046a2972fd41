"""CMA-CLIP: multi-task product attribute classification from image and title (Liu et al.).

The model library: config, encoders, model, stages, training, losses, metrics, checkpoints. It imports
torch and open_clip, never airflow, mlflow or fsspec (those live in `pipeline`).

`import cmaclip` and `cmaclip.config` do not import torch: the exports that need it load on first use
(PEP 562), so the DAG processor and the pipeline's contracts can read stage names and configs cheaply.
"""
import importlib

from .config import CMACLIPConfig, CLIPConfig, CMAConfig, StageConfig, TrainConfig, load_config, with_variant

_LAZY = {  # export -> the submodule that defines it (imports torch)
    **dict.fromkeys(("CMACLIP", "CMACLIPOutput", "MLPHead", "ModalityAttention", "SequenceAttention",
                     "create_model"), "model"),
    **dict.fromkeys(("Checkpoint", "load_checkpoint", "save_checkpoint"), "checkpoint"),
}

__all__ = ["CMACLIPConfig", "CLIPConfig", "CMAConfig", "StageConfig", "TrainConfig", "load_config", "with_variant",
           *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
