"""Pytree key paths as names: a leaf module every package may import."""
from __future__ import annotations

from typing import Any, Sequence, Tuple

__all__ = ["path_names"]


def _key_name(entry) -> str:
    """The name of one pytree key-path entry (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_names(path: Sequence[Any]) -> Tuple[str, ...]:
    """A pytree key path as a tuple of names, e.g. ('layers_0', 'mixer', 'A_log')."""
    return tuple(_key_name(entry) for entry in path)
