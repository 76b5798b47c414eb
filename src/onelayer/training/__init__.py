"""Training: the RL recipe of one run (:mod:`.train`), of layer variants trained together
(:mod:`.concurrent`), and the parts both use (:mod:`.step`, :mod:`.setup`)."""

from .concurrent import train_variants
from .setup import Run, TrainResult, model_for
from .train import train

__all__ = ["Run", "TrainResult", "model_for", "train", "train_variants"]
