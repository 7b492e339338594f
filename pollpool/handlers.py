"""Handlers: built-in native ones, and the wrapper for users' C functions."""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional, Tuple

from ._core import ffi, lib

#: The native handler ABI this pollpool implements (``POLLPOOL_ABI_VERSION``).
ABI_VERSION: int = lib.POLLPOOL_ABI_VERSION
#: The oldest ABI a library may be built for and still load (version 2 only
#: appended to struct pp_reply).
ABI_MIN: int = lib.POLLPOOL_ABI_MIN

# dlopen()ed libraries are never closed: a worker may be inside one.
_LIBRARIES: Dict[str, Any] = {}
_LIBRARIES_LOCK = threading.Lock()


def _dlerror() -> str:
    msg = lib.pp_py_dlerror()
    return ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else "unknown error"


def _check_signature(fn: Any) -> None:
    """Refuses a cffi function pointer whose type is not pp_handler_fn's shape:
    int (*)(void *, const unsigned char *, size_t, pp_reply *)."""
    try:
        t = ffi.typeof(fn)
    except TypeError:
        return  # not a cdata: an address, checked by the caller
    if t.kind == "pointer" and t.item.kind == "function":
        t = t.item
    if t.kind != "function":
        raise TypeError(f"expected a C function pointer, got {t.cname}")
    args = t.args
    ok = (
        t.result.kind == "primitive" and t.result.cname == "int"
        and len(args) == 4
        and args[0].kind == "pointer"
        and args[1].kind == "pointer" and args[1].item.cname in ("char", "unsigned char", "uint8_t")
        and args[2].kind == "primitive" and ffi.sizeof(args[2]) == ffi.sizeof("size_t")
        and args[3].kind == "pointer"
        and not t.ellipsis
    )
    if not ok:
        raise TypeError(
            f"handler has type {t.cname}; expected "
            "int(*)(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)"
        )


def _as_pointer(value: Any, ctype: str, what: str) -> Any:
    if value is None:
        return ffi.NULL
    if isinstance(value, int):
        if value == 0:
            raise ValueError(f"{what} is a NULL address")
        return ffi.cast(ctype, value)
    try:
        return ffi.cast(ctype, value)
    except TypeError as e:
        raise TypeError(f"{what} must be a cffi function pointer or an address: {e}") from None


class NativeHandler:
    """A C handler with the ``pp_handler_fn`` signature of ``pollpool.h``,
    called on worker threads without the GIL, concurrently: it must be
    thread-safe.

    Build one with :meth:`from_library` (a shared library and a symbol) or
    :meth:`from_pointer` (a cffi function pointer or an address).  ``ctx`` is
    passed to every call; a cffi pointer given here is kept alive by this
    object.  Optional ``on_open``/``on_close`` hooks (``pp_open_fn``,
    ``pp_close_fn``) see each connection come and go.
    """

    __slots__ = ("_fn", "_ctx", "_on_open", "_on_close", "_keep", "name")

    def __init__(self, fn: Any, ctx: Any = None, *, on_open: Any = None, on_close: Any = None,
                 name: Optional[str] = None, _keep: Any = None) -> None:
        _check_signature(fn)
        self._fn = _as_pointer(fn, "pp_handler_fn", "fn")
        if self._fn == ffi.NULL:
            raise ValueError("fn is a NULL pointer")
        self._on_open = _as_pointer(on_open, "pp_open_fn", "on_open")
        self._on_close = _as_pointer(on_close, "pp_close_fn", "on_close")
        if ctx is None:
            self._ctx = ffi.NULL
        elif isinstance(ctx, int):
            self._ctx = ffi.cast("void *", ctx)
        else:
            self._ctx = ffi.cast("void *", ctx)
        self._keep = (ctx, _keep)  # what the pointers point into stays alive
        self.name = name or "native handler"

    @classmethod
    def from_pointer(cls, fn: Any, ctx: Any = None, *, on_open: Any = None,
                     on_close: Any = None) -> "NativeHandler":
        """Wraps a function pointer from the user's own cffi module
        (``ffi.addressof(lib, "name")``, signature checked) or an integer
        address (not checkable: it must be a ``pp_handler_fn``)."""
        if isinstance(fn, int):
            if fn == 0:
                raise ValueError("fn is a NULL address")
            return cls(ffi.cast("pp_handler_fn", fn), ctx, on_open=on_open, on_close=on_close,
                       name=f"handler at {fn:#x}")
        return cls(fn, ctx, on_open=on_open, on_close=on_close, name=repr(fn))

    @classmethod
    def from_library(cls, path: str, symbol: str, ctx: Any = None) -> "NativeHandler":
        """Loads ``symbol`` from the shared library at ``path``.

        ``symbol_open`` and ``symbol_close``, if the library has them, become
        the connection hooks.  If it exports ``pollpool_abi_version`` (see
        ``POLLPOOL_EXPORT_ABI_VERSION;``) and that differs from
        :data:`ABI_VERSION`, the library is refused with ImportError.
        Raises OSError if the library cannot be loaded, AttributeError if it
        has no such symbol.
        """
        path = os.fspath(path)
        if not isinstance(symbol, str) or not symbol:
            raise TypeError("symbol must be a non-empty str")
        handle = _load(path)
        fn = _symbol(handle, symbol)
        if fn == ffi.NULL:
            raise AttributeError(f"{path} has no symbol {symbol!r}: {_dlerror()}")
        version = _symbol(handle, "pollpool_abi_version")
        if version != ffi.NULL:
            found = ffi.cast("const int *", version)[0]
            if not ABI_MIN <= found <= ABI_VERSION:
                raise ImportError(
                    f"{path} was built for pollpool native ABI version {found}, "
                    f"but this pollpool implements versions {ABI_MIN} to {ABI_VERSION}; rebuild it "
                    f"against the pollpool.h in {_include_dir()}"
                )
        on_open = _symbol(handle, symbol + "_open")
        on_close = _symbol(handle, symbol + "_close")
        return cls(
            ffi.cast("pp_handler_fn", fn), ctx,
            on_open=None if on_open == ffi.NULL else ffi.cast("pp_open_fn", on_open),
            on_close=None if on_close == ffi.NULL else ffi.cast("pp_close_fn", on_close),
            name=f"{path}:{symbol}",
        )

    def _pointers(self) -> Tuple[Any, Any, Any, Any]:
        return self._fn, self._ctx, self._on_open, self._on_close

    def __repr__(self) -> str:
        return f"<NativeHandler {self.name}>"


def _load(path: str) -> Any:
    real = os.path.realpath(path)
    with _LIBRARIES_LOCK:
        handle = _LIBRARIES.get(real)
        if handle is None:
            if not os.path.exists(path):
                raise OSError(2, f"cannot load native handler library {path}: no such file")
            handle = lib.pp_py_dlopen(real.encode())
            if handle == ffi.NULL:
                raise OSError(f"cannot load native handler library {path}: {_dlerror()}")
            _LIBRARIES[real] = handle
        return handle


def _symbol(handle: Any, name: str) -> Any:
    return lib.pp_py_dlsym(handle, name.encode())


def _include_dir() -> str:
    from . import get_include

    return get_include()


#: Replies with each message unchanged: the server becomes the identity.
echo = NativeHandler(lib.pp_py_echo_fn(), name="pollpool.handlers.echo")

__all__ = ["ABI_VERSION", "NativeHandler", "echo"]
