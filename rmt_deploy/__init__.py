"""rmt-deploy: RMT (Retentive Networks Meet Vision Transformers) from checkpoint to production."""
from .checkpoint import CheckpointError, read_checkpoint
from .factory import create_model
from .model import RMT, VARIANTS, RMTConfig

__version__ = "0.1.0"
__all__ = ["create_model", "read_checkpoint", "CheckpointError", "RMT", "RMTConfig", "VARIANTS", "__version__"]
