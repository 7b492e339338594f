"""The PROXY protocol (v1 and v2) in front of pollpool: a trusted balancer's
header names the client, which handlers see as ``conn.peer`` (the balancer
as ``conn.proxy_peer``); anything else is refused and counted.  The headers
are written here byte for byte as the spec (and HAProxy's send-proxy) has
them; tests/c/test_proxy.c covers the parser's every form."""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import threading
import time

import pytest

import pollpool
from conftest import Client, wait_closed, wait_for, wait_stat

pytestmark = pytest.mark.timeout(60)

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"", local: bool = False) -> bytes:
    if local:
        return V2_SIG + b"\x20\x00" + struct.pack("!H", 0)
    if ":" in src:
        body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
        fam = 0x21
    else:
        body = socket.inet_aton(src) + socket.inet_aton(dst)
        fam = 0x11
    body += struct.pack("!HH", sport, dport) + tlvs
    return V2_SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


class Seen:
    """A connection-aware handler that tells who it saw."""

    def __init__(self) -> None:
        self.peers: list = []

    def on_connect(self, conn):
        self.peers.append((conn.peer, conn.proxy_peer))
        return None

    def on_message(self, conn, message):
        return b"%s %d" % (conn.peer[0].encode(), conn.peer[1]) if message == b"who" else message


def test_a_v1_header_names_the_client_and_keeps_the_balancer(make_server):
    h = Seen()
    srv = make_server(h, proxy_protocol=True)
    c = Client(srv.address)
    try:
        c.send(v1("198.18.0.7", "198.18.0.1", 40000, 9000) + b"who\nping\n")
        assert c.recv_messages(2) == [b"198.18.0.7 40000", b"ping"]
        peer, balancer = h.peers[0]
        assert peer == ("198.18.0.7", 40000)
        assert balancer == c.sock.getsockname()
    finally:
        c.close()


def test_a_v2_header_split_across_writes_with_tlvs(make_server):
    h = Seen()
    srv = make_server(h, proxy_protocol=True)
    header = v2("2001:db8::5", "2001:db8::1", 5555, 9000,
                tlvs=b"\x01\x00\x02h2" + b"\x04\x00\x00")
    c = Client(srv.address)
    try:
        c.send_slowly(header + b"who\n", step=3)
        assert c.recv_message() == b"2001:db8::5 5555"
        assert h.peers[0][0] == ("2001:db8::5", 5555)
    finally:
        c.close()


def test_local_keeps_the_socket_address_for_health_checks(make_server):
    h = Seen()
    srv = make_server(h, proxy_protocol=True)
    c = Client(srv.address)
    try:
        c.send(v2("", "", 0, 0, local=True) + b"who\n")
        host, port = c.sock.getsockname()
        assert c.recv_message() == b"%s %d" % (host.encode(), port)
        assert h.peers[0] == ((host, port), None)
    finally:
        c.close()


def test_plain_and_coroutine_handlers_behind_a_balancer(make_server):
    srv = make_server(lambda m: m.upper(), proxy_protocol=True)
    c = Client(srv.address)
    try:
        c.send(v1("198.18.0.9", "198.18.0.1", 1, 2) + b"a\nb\n")
        assert c.recv_messages(2) == [b"A", b"B"]
    finally:
        c.close()

    seen: list = []

    class Async:
        async def on_connect(self, conn):
            seen.append((conn.peer, conn.proxy_peer))

        async def on_message(self, conn, message):
            await asyncio.sleep(0)
            return message

    srv2 = make_server(Async(), proxy_protocol=True)
    d = Client(srv2.address)
    try:
        d.send(v2("198.18.3.4", "198.18.0.1", 4444, 9000) + b"x\n")
        assert d.recv_message() == b"x"
        assert seen == [(("198.18.3.4", 4444), d.sock.getsockname())]
    finally:
        d.close()


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.0\r\n\r\n",                                      # not a balancer
    b"PROXY TCP4 198.18.0.7 198.18.0.1 40000 9000\n",               # bare LF
    b"PROXY TCP4 198.18.0.7 198.18.0.1 040000 9000\r\nx\n",         # leading zero
    v1("198.18.0.7", "198.18.0.1", 1, 2) + v1("1.2.3.4", "1.2.3.5", 3, 4),  # twice
    V2_SIG + b"\x21\x11\x00\x0b" + b"\x00" * 11,                    # length that lies
], ids=["http", "bare-lf", "leading-zero", "duplicated", "short-v2"])
def test_a_bad_header_closes_the_connection_only_and_is_counted(make_server, data):
    h = Seen()
    srv = make_server(h, proxy_protocol=True)
    c = Client(srv.address)
    try:
        c.send(data)
        assert wait_closed(c) == b""
    finally:
        c.close()
    wait_stat(srv, "proxy_errors", 1)
    good = Client(srv.address)
    try:
        good.send(v1("198.18.0.8", "198.18.0.1", 8, 9) + b"ok\n")
        assert good.recv_message() == b"ok"
    finally:
        good.close()
    assert [p for p, _ in h.peers] == [("198.18.0.8", 8)]   # the bad one never reached it


def test_a_partial_header_then_eof_or_silence_is_refused(make_server):
    srv = make_server(proxy_protocol=True, proxy_timeout=0.3)
    c = Client(srv.address)
    try:
        c.send(b"PROXY TCP4 198.18")
        c.shutdown_write()
        assert wait_closed(c) == b""
    finally:
        c.close()
    d = Client(srv.address)
    try:
        t0 = time.monotonic()
        assert wait_closed(d, timeout=10) == b""
        assert time.monotonic() - t0 >= 0.25
    finally:
        d.close()
    assert wait_stat(srv, "proxy_errors", 2) == 2


def test_an_untrusted_source_is_refused_even_with_a_valid_header(make_server):
    h = Seen()
    srv = make_server(h, proxy_protocol=True, trusted_proxies=["10.0.0.0/8", "fd00::/8"])
    c = Client(srv.address)
    try:
        try:
            c.send(v1("198.18.0.7", "198.18.0.1", 40000, 9000) + b"who\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut before the bytes went: as refused
        assert wait_closed(c) == b""   # EOF or a reset, never a reply
    finally:
        c.close()
    wait_stat(srv, "proxy_errors", 1)
    assert h.peers == [] and srv.stats()["accepted"] == 0


def test_without_proxy_protocol_a_header_is_just_data(make_server):
    srv = make_server(lambda m: m)
    c = Client(srv.address)
    try:
        c.send(b"PROXY TCP4 198.18.0.7 198.18.0.1 1 2\r\n")
        assert c.recv_message() == b"PROXY TCP4 198.18.0.7 198.18.0.1 1 2\r"
    finally:
        c.close()


@pytest.mark.parametrize("kwargs,exc", [
    ({"trusted_proxies": "10.0.0.0/8"}, TypeError),
    ({"trusted_proxies": ["10.0.0.0/33"]}, ValueError),
    ({"trusted_proxies": ["example.com"]}, ValueError),
    ({"trusted_proxies": [10]}, TypeError),
    ({"proxy_protocol": 1}, TypeError),
    ({"proxy_protocol": True, "proxy_timeout": 0}, ValueError),
    ({"proxy_timeout": -1}, ValueError),
])
def test_proxy_configuration_is_checked(kwargs, exc):
    with pytest.raises(exc):
        pollpool.Server(pollpool.handlers.echo, port=0, **kwargs)


def test_cli_serves_behind_a_balancer(spawn):
    child = spawn(["-m", "pollpool", "--port", "0", "--handler", "echo", "--proxy-protocol",
                   "--trusted-proxy", "127.0.0.1/32", "--trusted-proxy", "::1"])
    host, port = child.wait_listening()
    c = Client((host, port))
    try:
        c.send(v1("198.18.0.7", "198.18.0.1", 1, 2) + b"hi\n")
        assert c.recv_message() == b"hi"
    finally:
        c.close()
    child.signal(signal.SIGINT)
    assert child.wait(20) == 0
    bad = spawn(["-m", "pollpool", "--port", "0", "--proxy-protocol", "--trusted-proxy", "nope"])
    assert bad.wait(20) not in (0, None)
    assert "trusted_proxies" in bad.stderr()


def test_many_balanced_connections_at_once(make_server):
    h = Seen()
    srv = make_server(h, proxy_protocol=True, threads=2)
    errors: list = []

    def one(i: int) -> None:
        try:
            c = Client(srv.address)
            try:
                c.send(v2("198.18.%d.%d" % (i // 250, i % 250 + 1), "198.18.0.1", 1000 + i, 9000)
                       + b"who\n")
                assert c.recv_message() == b"198.18.%d.%d %d" % (i // 250, i % 250 + 1, 1000 + i)
            finally:
                c.close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    wait_for(lambda: len(h.peers) == 200)
    assert srv.stats()["proxy_errors"] == 0


NATIVE = r"""
#include <stdio.h>
#include <string.h>
#include "pollpool.h"
POLLPOOL_EXPORT_ABI_VERSION;

/* "who": the client, then the balancer (or "-"), as pollpool.h gives them. */
POLLPOOL_EXPORT int who(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    (void)ctx; (void)msg; (void)len;
    char host[64], bal[64] = "-", out[160];
    int port = 0, bport = 0;
    if (pp_peer(reply, host, sizeof host, &port) < 0)
        strcpy(host, "?");
    if (pp_proxy_peer(reply, bal, sizeof bal, &bport) < 0)
        strcpy(bal, "-");
    int n = snprintf(out, sizeof out, "%s %d %s", host, port, bal);
    return pp_reply_write(reply, out, (size_t)n) < 0 ? -1 : PP_KEEP;
}
"""


def test_native_handlers_see_the_client_and_the_balancer(make_server, tmp_path):
    from test_native_handlers import build
    lib = build(tmp_path, NATIVE, "who")
    srv = make_server(pollpool.NativeHandler.from_library(str(lib), "who"), proxy_protocol=True)
    c = Client(srv.address)
    try:
        c.send(v2("198.18.9.9", "198.18.0.1", 9999, 9000) + b"who\n")
        assert c.recv_message() == b"198.18.9.9 9999 127.0.0.1"
    finally:
        c.close()
    d = Client(srv.address)
    try:
        d.send(v2("", "", 0, 0, local=True) + b"who\n")
        assert d.recv_message() == b"127.0.0.1 %d -" % d.sock.getsockname()[1]
    finally:
        d.close()
