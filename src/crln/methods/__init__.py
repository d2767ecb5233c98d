"""Training methods, one file each, selected by ``method.name`` in the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from crln.models import network_factory

if TYPE_CHECKING:
    from crln.config import RunConfig

__all__ = [
    "Method",
    "MethodConfig",
    "build_method",
    "method_class",
    "method_config_class",
    "method_for_run",
    "method_names",
    "register_method",
]


def method_for_run(config: RunConfig) -> Method:
    """The method of a run config (``method``), its networks built as ``model`` says for ``data.num_classes``."""
    return build_method(config.method, network_factory(config), config.data.num_classes)
