"""Handlers: built-in native ones, and the wrapper for native C functions."""

from __future__ import annotations

from typing import Any

from ._core import ffi, lib


class NativeHandler:
    """A C function with the ``pp_handler_fn`` signature of ``pollpool.h``,
    called on worker threads without the GIL.

    ``fn`` is a cffi function pointer; ``ctx`` an optional cffi pointer passed
    to every call (kept alive by this object).
    """

    __slots__ = ("_fn", "_ctx", "name")

    def __init__(self, fn: Any, ctx: Any = None, *, name: str | None = None) -> None:
        try:
            self._fn = ffi.cast("pp_handler_fn", fn)
        except TypeError as e:
            raise TypeError(f"fn must be a cffi function pointer or an address: {e}") from None
        if self._fn == ffi.NULL:
            raise ValueError("fn is a NULL pointer")
        self._ctx = ctx
        self.name = name or "native handler"

    def _pointers(self) -> tuple[Any, Any]:
        ctx = ffi.NULL if self._ctx is None else ffi.cast("void *", self._ctx)
        return self._fn, ctx

    def __repr__(self) -> str:
        return f"<NativeHandler {self.name}>"


#: Replies with each message unchanged: the server becomes the identity.
echo = NativeHandler(ffi.addressof(lib, "pp_handler_echo"), name="pollpool.handlers.echo")

__all__ = ["NativeHandler", "echo"]
