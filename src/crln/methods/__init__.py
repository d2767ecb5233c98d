"""Training methods, one file each, selected by ``method.name`` in the config."""

from __future__ import annotations

from crln.methods import bcp as _bcp  # noqa: F401  (registers the method)
from crln.methods import crln as _crln  # noqa: F401  (registers the method)
from crln.methods import mean_teacher as _mean_teacher  # noqa: F401  (registers the method)
from crln.methods import supervised as _supervised  # noqa: F401  (registers the method)
from crln.methods import ua_mt as _ua_mt  # noqa: F401  (registers the method)
from crln.methods.base import (
    Method,
    MethodConfig,
    build_method,
    method_class,
    method_config_class,
    method_names,
    register_method,
)

__all__ = [
    "Method",
    "MethodConfig",
    "build_method",
    "method_class",
    "method_config_class",
    "method_names",
    "register_method",
]
