"""Per-connection state for connection-aware Python handlers."""

from __future__ import annotations

from typing import Any, Tuple


class Connection:
    """One client connection, as a connection-aware handler sees it.

    ``id`` is unique for the server's lifetime; ``peer`` is the client's
    ``(host, port)``; ``state`` (and any other attribute you set) is yours.
    Handler calls for one connection never overlap, so its state needs no lock
    as long as only its own handler calls touch it.
    """

    def __init__(self, conn_id: int, peer: Tuple[str, int]) -> None:
        self.id = conn_id
        self.peer = peer
        self.state: Any = None
        self.closing = False

    def close(self) -> None:
        """Closes the connection once the replies already returned are sent.
        Messages that arrived after the current one get no handler call.
        Call it from this connection's own handler."""
        self.closing = True

    def __repr__(self) -> str:
        return f"<pollpool.Connection {self.id} {self.peer[0]}:{self.peer[1]}{' closing' if self.closing else ''}>"
