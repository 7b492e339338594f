"""Per-connection state for connection-aware Python handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Tuple, Union

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server
    from .types import BytesLike


class PeerCred(NamedTuple):
    """A Unix-socket client's credentials (SO_PEERCRED), its ``conn.peer``."""

    pid: int
    uid: int
    gid: int


class Connection:
    """One client connection, as a connection-aware handler sees it.

    ``id`` is unique for the server's lifetime (never reused); ``peer`` is the
    client's ``(host, port)``, or its :class:`PeerCred` over a Unix socket (with ``proxy_protocol``, the client the
    balancer's header names; ``proxy_peer`` is then the balancer's, else
    None); ``state`` (and any other attribute you set) is
    yours.  Handler calls for one connection never overlap, so its state needs
    no lock as long as only its own handler calls touch it.

    :meth:`send`, :meth:`close`, :meth:`subscribe` and :meth:`unsubscribe`
    are thread-safe: call them from any thread, inside a handler or not.
    """

    __slots__ = ("id", "peer", "proxy_peer", "state", "closing", "_server", "__dict__")

    def __init__(self, conn_id: int, peer: Union[Tuple[str, int], "PeerCred"],
                 server: Optional[Callable[[], Optional["Server"]]] = None,
                 proxy_peer: Optional[Tuple[str, int]] = None) -> None:
        self.id = conn_id
        self.peer = peer
        self.proxy_peer = proxy_peer
        self.state: Any = None
        self.closing = False
        self._server = server

    def _srv(self) -> Optional["Server"]:
        return self._server() if self._server is not None else None

    def send(self, data: "BytesLike") -> bool:
        """Queues ``data``, framed like a reply, to this connection; see
        :meth:`Server.send`.  Inside this connection's own handler, it goes
        after the replies the current task has produced."""
        srv = self._srv()
        return srv is not None and srv.send(self.id, data)

    def close(self) -> None:
        """Closes the connection once what was queued for it is sent.  In its
        own handler: after the replies already returned, and the messages
        that arrived after the current one get no handler call."""
        self.closing = True
        srv = self._srv()
        if srv is not None:
            srv.close_connection(self.id)

    def subscribe(self, topic: Union[str, bytes]) -> bool:
        """Subscribes to ``topic``: :meth:`Server.publish` to it reaches this
        connection.  False if the connection is gone."""
        srv = self._srv()
        return srv is not None and srv._subscribe(self.id, topic, True)

    def unsubscribe(self, topic: Union[str, bytes]) -> bool:
        srv = self._srv()
        return srv is not None and srv._subscribe(self.id, topic, False)

    @property
    def pending(self) -> int:
        """Bytes queued for this connection and not yet sent (pushes and
        replies); 0 once it is gone."""
        srv = self._srv()
        return srv._pending(self.id) if srv is not None else 0

    def __repr__(self) -> str:
        closing = " closing" if self.closing else ""
        return f"<pollpool.Connection {self.id} {self.peer[0]}:{self.peer[1]}{closing}>"
