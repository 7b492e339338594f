"""The one module that touches the compiled ``pollpool._native`` module."""

from __future__ import annotations

from ._native import ffi, lib  # type: ignore[import-not-found]

__all__ = ["ffi", "lib"]
