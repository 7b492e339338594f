"""The one module that touches the compiled ``pollpool._native`` module."""

from __future__ import annotations

import os

try:
    from ._native import ffi, lib  # type: ignore[import-not-found]
except ImportError as e:  # pragma: no cover - exercised in a subprocess
    _here = os.path.dirname(os.path.abspath(__file__))
    _checkout = os.path.isfile(os.path.join(os.path.dirname(_here), "setup.py"))
    _how = (f"build it in place with: python -m pip install -e {os.path.dirname(_here)!r}, "
            f"or run from outside the checkout if pollpool is installed"
            if _checkout else "reinstall pollpool: python -m pip install --force-reinstall pollpool")
    raise ImportError(
        f"pollpool's compiled core (pollpool._native) is missing or broken in {_here}: "
        f"{e}.  {_how[0].upper()}{_how[1:]}.") from e

__all__ = ["ffi", "lib"]
