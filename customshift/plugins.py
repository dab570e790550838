"""Named parts that live outside the core, found by entry point: a config names them, the core imports them then.

The sprite domain (`customshift.sprites`) plugs into training this way, exactly as a user's own package would:
``data.kind: synthetic`` and ``model.pretrained: sprite`` are entry points of this package (pyproject.toml,
``[project.entry-points."customshift.data"]`` and ``."customshift.models"``). A data source can also be named
directly as ``package.module:Class`` without packaging it.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

__all__ = ["GROUPS", "is_registered", "load", "names"]

GROUPS = {"data": "customshift.data", "models": "customshift.models"}
_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def names(group: str) -> list[str]:
    """The names registered in ``group`` (``data`` or ``models``) by installed packages."""
    return sorted({ep.name for ep in entry_points(group=GROUPS[group])})


def load(group: str, name: str, *, dotted: bool = False) -> Any:
    """The object registered as ``name`` in ``group`` (or, with ``dotted``, named ``module:attribute``).

    Raises LookupError naming the registered names when there is no such part.
    """
    found = [ep for ep in entry_points(group=GROUPS[group]) if ep.name == name]
    if found:
        return found[0].load()
    if dotted and _DOTTED.match(name):
        module, attribute = name.split(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise LookupError(f"{name!r} could not be imported: {error}") from None
    raise LookupError(f"unknown name {name!r}; registered: {', '.join(names(group)) or 'none'}"
                      + (" (or package.module:Class)" if dotted else ""))


def is_registered(group: str, name: str) -> bool:
    return any(ep.name == name for ep in entry_points(group=GROUPS[group]))
