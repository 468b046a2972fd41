"""CMA-CLIP: multi-task product attribute classification from image and title (Liu et al.).

The model library: config, encoders, model, stages, training, losses, metrics, checkpoints. It imports
torch and open_clip, never airflow, mlflow or fsspec (those live in `pipeline`).
"""
from .config import CMACLIPConfig, CLIPConfig, CMAConfig, StageConfig, TrainConfig, load_config, with_variant
from .model import CMACLIP, CMACLIPOutput, MLPHead, ModalityAttention, SequenceAttention, create_model
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint

__all__ = [
    "CMACLIPConfig", "CLIPConfig", "CMAConfig", "StageConfig", "TrainConfig", "load_config", "with_variant",
    "CMACLIP", "CMACLIPOutput", "MLPHead", "ModalityAttention", "SequenceAttention", "create_model",
    "Checkpoint", "load_checkpoint", "save_checkpoint",
]
__version__ = "0.1.0"
