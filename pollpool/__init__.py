"""pollpool: a TCP server for Python whose hot path is C.

One ``poll()`` I/O thread, a pool of worker threads, graceful shutdown on
Ctrl+C; handlers in Python or in C.
"""

from __future__ import annotations

import os

from . import handlers, types
from .connection import Connection, PeerCred
from .framing import LengthPrefixed, Lines, Raw, parse_framing
from .handlers import NativeHandler
from .server import Server
from .types import ConnectionHandler, Handler, MessageHandler, OnConnect, OnDisconnect, OnMessage, Reply

__version__ = "0.1.0"


def get_include() -> str:
    """The folder holding ``pollpool.h``, for compiling native handlers."""
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "include")
    if os.path.isfile(os.path.join(installed, "pollpool.h")):
        return installed
    # An editable install or a source checkout: the header lives in csrc/.
    return os.path.join(os.path.dirname(here), "csrc")


__all__ = [
    "Connection", "ConnectionHandler", "Handler", "LengthPrefixed", "Lines", "MessageHandler",
    "NativeHandler", "OnConnect", "OnDisconnect", "OnMessage", "PeerCred", "Raw", "Reply", "Server",
    "get_include", "handlers", "parse_framing", "types", "__version__",
]
