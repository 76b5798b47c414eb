"""onelayer: RL post-training of LLMs that trains only the layers that matter.

The Python API does what the CLI does::

    from onelayer import TrainConfig, ScanConfig, train, run_scan
    train(TrainConfig(model="smollm2", layers="middle:1", out="runs/mid"))
    run_scan(ScanConfig(recipe=TrainConfig(layers="every:4", out="scans/arith")))  # writes the profile too

Any Hugging Face model, for another trainer (TRL, a torch loop)::

    kept = onelayer.select_layers(model, "top:5@scans/arith")   # freezes the rest; kept.names, kept.parameters
    optimizer = torch.optim.AdamW(kept.param_groups(lr=1e-5, lr_from="scans/arith"))

The entry points load on first use, so ``import onelayer`` (and the CLI's ``--help``) stays fast.
"""

from importlib import import_module

from .config import CompareConfig, EvalConfig, OODConfig, SamplingConfig, ScanConfig, TrainConfig
from .errors import OneLayerError

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "train": "onelayer.training",
    "train_variants": "onelayer.training",
    "run_scan": "onelayer.experiments.scan",
    "write_profile": "onelayer.experiments.scan",
    "run_comparison": "onelayer.experiments.compare",
    "run_eval": "onelayer.evaluate",
    "read_profile": "onelayer.profile",
    "select_layers": "onelayer.interop",
}


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'onelayer' has no attribute {name!r}")


__all__ = ["CompareConfig", "EvalConfig", "OODConfig", "OneLayerError", "SamplingConfig", "ScanConfig",
           "TrainConfig", "__version__", *_ENTRY_POINTS]
