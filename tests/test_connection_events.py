"""Connection-aware Python handlers: on_connect, on_message, on_disconnect in
order for every connection, exactly one disconnect per connect (also at
shutdown and on RST), per-connection state, and conn.close()."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest

import pollpool
from conftest import LINE, Client, wait_closed, wait_for

pytestmark = pytest.mark.timeout(120)


class Recorder:
    """Records every event; replies "<n>:<message>" with n counted in
    conn.state, so a mixed-up connection shows in the replies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: dict[int, list] = {}
        self.errors: list = []

    def _add(self, conn, ev):
        with self.lock:
            self.events.setdefault(conn.id, []).append(ev)

    def on_connect(self, conn):
        if conn.state is not None:
            self.errors.append(("state before connect", conn.id))
        conn.state = 0
        self._add(conn, "connect")
        if conn.peer[0] != "127.0.0.1" or not isinstance(conn.peer[1], int):
            self.errors.append(("peer", conn.peer))

    def on_message(self, conn, msg):
        self._add(conn, "message")
        if msg == b"bye":
            conn.close()
            return b"closing"
        conn.state += 1
        return b"%d:%s" % (conn.state, msg)

    def on_disconnect(self, conn):
        self._add(conn, "disconnect")


def check_sequences(events: dict[int, list]) -> None:
    for cid, evs in events.items():
        assert evs[0] == "connect", (cid, evs[:3])
        assert evs[-1] == "disconnect", (cid, evs[-3:])
        assert evs.count("connect") == 1 and evs.count("disconnect") == 1, (cid, evs)


def test_events_come_in_order_and_state_is_per_connection(make_server):
    rec = Recorder()
    srv = make_server(rec, threads=8)
    a, b = Client(srv.address), Client(srv.address)
    try:
        assert a.exchange([b"x", b"y"]) == [b"1:x", b"2:y"]
        assert b.exchange([b"z"]) == [b"1:z"]
        assert a.exchange([b"w"]) == [b"3:w"]
    finally:
        a.close(), b.close()
    assert wait_for(lambda: sum(e.count("disconnect") for e in rec.events.values()) == 2)
    check_sequences(rec.events)
    assert not rec.errors


def test_conn_close_sends_pending_replies_then_closes(make_server):
    rec = Recorder()
    srv = make_server(rec)
    c = Client(srv.address)
    try:
        c.send_messages([b"a", b"bye", b"dropped"])
        assert c.recv_messages(2) == [b"1:a", b"closing"]
        assert wait_closed(c) == b""
    finally:
        c.close()
    assert wait_for(lambda: any("disconnect" in e for e in rec.events.values()))
    (evs,) = rec.events.values()
    assert evs == ["connect", "message", "message", "disconnect"]


def test_on_connect_can_greet_and_partial_handlers_work(make_server):
    class Greeter:
        def on_connect(self, conn):
            return b"welcome %d" % conn.id

    srv = make_server(Greeter())
    c = Client(srv.address)
    try:
        assert c.recv_message().startswith(b"welcome ")
        c.send_messages([b"ignored"])  # no on_message: no reply
        c.send_messages([b"still ignored"])
        with pytest.raises(socket.timeout):
            c.sock.settimeout(0.3)
            c.recv_message()
    finally:
        c.close()


def test_200_connections_random_lifecycles_under_8_workers(make_server):
    """Opening, sending, closing cleanly or with RST at random, 20 at a time:
    every connect has exactly one disconnect, messages only between them."""
    rec = Recorder()
    srv = make_server(rec, threads=8)
    failures: list = []

    def life(k: int) -> None:
        rnd = random.Random(k)
        try:
            c = Client(srv.address, timeout=20)
            try:
                n = rnd.randint(0, 30)
                if n:
                    msgs = [b"%d-%d" % (k, i) for i in range(n)]
                    if rnd.random() < 0.3:
                        c.send_messages(msgs)  # do not wait for the replies
                    elif c.exchange(msgs) != [b"%d:%s" % (i + 1, m) for i, m in enumerate(msgs)]:
                        failures.append(k)
                if rnd.random() < 0.4:  # abortive close: RST
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                c.close()
        except Exception as e:
            failures.append((k, repr(e)))

    for start in range(0, 200, 20):
        threads = [threading.Thread(target=life, args=(k,)) for k in range(start, start + 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert wait_for(lambda: srv.stats()["active"] == 0, 10)
    assert wait_for(lambda: sum(e.count("disconnect") for e in list(rec.events.values())) == 200, 10)
    assert len(rec.events) == 200
    check_sequences(rec.events)
    assert not rec.errors


def test_disconnect_is_delivered_at_shutdown(make_server):
    rec = Recorder()
    srv = make_server(rec, shutdown_message=b"BYE")
    clients = [Client(srv.address) for _ in range(5)]
    try:
        for c in clients:
            assert c.exchange([b"hi"]) == [b"1:hi"]
        srv.stop(timeout=10)
        for c in clients:
            assert wait_closed(c) == LINE.frame(b"BYE")
    finally:
        for c in clients:
            c.close()
    assert len(rec.events) == 5
    check_sequences(rec.events)
    assert all(e == ["connect", "message", "disconnect"] for e in rec.events.values())


def test_a_failing_on_connect_closes_but_still_disconnects(make_server, caplog):
    class Picky(Recorder):
        def on_connect(self, conn):
            super().on_connect(conn)
            raise RuntimeError("go away")

    rec = Picky()
    srv = make_server(rec)
    c = Client(srv.address)
    try:
        assert wait_closed(c) == b""
    finally:
        c.close()
    assert wait_for(lambda: any("disconnect" in e for e in rec.events.values()))
    assert list(rec.events.values()) == [["connect", "disconnect"]]
    assert "go away" in caplog.text
    assert srv.stats()["handler_errors"] == 1
