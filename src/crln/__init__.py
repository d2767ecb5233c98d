"""crln: semi-supervised 3D medical image segmentation (CRLN and baselines in one engine).

The Python API (``docs/api.md``)::

    from crln import Predictor, evaluate, load_config, train

Names load on first use, so ``import crln`` (and a config check of the CLI) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_API = {
    "load_config": "crln.config",
    "train": "crln.engine.trainer",
    "TrainResult": "crln.engine.trainer",
    "evaluate": "crln.evaluation",
    "Predictor": "crln.predictor",
    "build_report": "crln.report",
    "run_plan": "crln.bench",
    "write_phantom_h5_dataset": "crln.data.phantom",
    "CrlnError": "crln.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'crln' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
