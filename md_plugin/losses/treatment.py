"""Deprecated location of the Model Doctor treatment; it lives in :mod:`md_plugin.doctor.treatment`.

The treatment moved beside the diagnosis so that ``md_plugin.doctor`` is the diagnose-and-treat
package (issue 20). Old imports (``from md_plugin.losses.treatment import ModelDoctor``) keep
working; every name read through this module warns with a ``DeprecationWarning`` naming the new
path. The warning is raised per attribute read (PEP 562), not once per process at import, so a
second importer still sees it.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..doctor import treatment as _new

__all__ = list(_new.__all__)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(_new, name)  # AttributeError for a name the new module lacks, as before
    warnings.warn(
        f"md_plugin.losses.treatment is deprecated: import {name} from md_plugin.doctor.treatment "
        "(or md_plugin.doctor)",
        DeprecationWarning,
        stacklevel=2,
    )
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
