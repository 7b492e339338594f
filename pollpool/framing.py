"""Framing objects: how a byte stream is cut into messages and replies framed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Union

DEFAULT_MAX_SIZE = 1 << 20
#: The largest max_size the core takes: its size_t (SIZE_MAX), meaning "no
#: limit but memory".
MAX_SIZE_LIMIT = 2 * sys.maxsize + 1


def _check_max_size(max_size: int) -> None:
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
    if not 1 <= max_size <= MAX_SIZE_LIMIT:
        raise ValueError(f"max_size must be between 1 and {MAX_SIZE_LIMIT}, got {max_size}")


@dataclass(frozen=True)
class Raw:
    """Every chunk read is a message (at most ``max_size`` bytes); replies go
    out as they are."""

    max_size: int = 64 * 1024

    def __post_init__(self) -> None:
        _check_max_size(self.max_size)


@dataclass(frozen=True)
class Lines:
    """Messages end with ``delimiter``; the handler sees them without it and
    each reply gets it appended."""

    delimiter: bytes = b"\n"
    max_size: int = DEFAULT_MAX_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.delimiter, (bytes, bytearray)):
            raise TypeError("delimiter must be bytes")
        if not 1 <= len(self.delimiter) <= 16:
            raise ValueError("delimiter must be 1 to 16 bytes long")
        object.__setattr__(self, "delimiter", bytes(self.delimiter))
        _check_max_size(self.max_size)


@dataclass(frozen=True)
class LengthPrefixed:
    """Messages follow a big-endian length header of ``header_bytes`` bytes;
    replies get the same header."""

    header_bytes: int = 4
    #: Defaults to 1 MiB, or what the header can express if that is less.
    max_size: int = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.header_bytes not in (1, 2, 4, 8) or isinstance(self.header_bytes, bool):
            raise ValueError(f"header_bytes must be 1, 2, 4 or 8, got {self.header_bytes!r}")
        if self.max_size is None:
            cap = (1 << (8 * self.header_bytes)) - 1
            object.__setattr__(self, "max_size", min(DEFAULT_MAX_SIZE, cap))
        _check_max_size(self.max_size)
        if self.header_bytes < 8 and self.max_size >= 1 << (8 * self.header_bytes):
            raise ValueError(
                f"max_size {self.max_size} does not fit a {self.header_bytes}-byte header"
            )


Framing = Union[Raw, Lines, LengthPrefixed]


def parse_framing(spec: str | Framing) -> Framing:
    """Turns ``"raw"``, ``"line"``, ``"line:\\r\\n"``, ``"length"``, ``"length:2"``
    or a framing object into a framing object."""
    if isinstance(spec, (Raw, Lines, LengthPrefixed)):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"framing must be a str or a framing object, not {type(spec).__name__}")
    kind, sep, arg = spec.partition(":")
    if kind == "raw" and not sep:
        return Raw()
    if kind == "line":
        if not sep:
            return Lines()
        delim = arg.encode("latin-1").decode("unicode_escape").encode("latin-1")
        return Lines(delimiter=delim)
    if kind == "length":
        if not sep:
            return LengthPrefixed()
        try:
            return LengthPrefixed(header_bytes=int(arg))
        except ValueError as e:
            raise ValueError(f"bad framing {spec!r}: {e}") from None
    raise ValueError(f"unknown framing {spec!r}: use 'raw', 'line[:DELIM]' or 'length[:1|2|4|8]'")
