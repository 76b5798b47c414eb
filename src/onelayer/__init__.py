"""onelayer: RL post-training of LLMs that trains only the layers that matter."""

from .config import EvalConfig, SamplingConfig, TrainConfig
from .errors import OneLayerError

__version__ = "0.1.0"
__all__ = ["EvalConfig", "OneLayerError", "SamplingConfig", "TrainConfig", "__version__"]
