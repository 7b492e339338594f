"""pollpool behind a real HAProxy (Debian's package), in network namespaces
this test builds: a client, a balancer running HAProxy with send-proxy-v2,
and two backends running pollpool with proxy_protocol, on addresses of
198.18.0.0/15 that exist only inside them.  The handlers see the client's
own address through the balancer; a client that reaches a backend directly
with a forged header is refused."""

from __future__ import annotations

import json
import signal
import textwrap
import time

import pytest
from netns import balancer_network

pytestmark = pytest.mark.timeout(120)

BACKEND = textwrap.dedent("""
    import json, sys, pollpool

    class Who:
        def on_message(self, conn, message):
            return b"%s %s %d via %s" % (sys.argv[1].encode(), conn.peer[0].encode(),
                                         conn.peer[1], conn.proxy_peer[0].encode())

    srv = pollpool.Server(Who(), host="0.0.0.0", port=9000, threads=2, proxy_protocol=True,
                          trusted_proxies=[sys.argv[2]])
    srv.serve_forever(on_ready=lambda: print("ready", flush=True))
    print(json.dumps(srv.stats()), flush=True)
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"who\\n")
        buf = b""
        while not buf.endswith(b"\\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        print(buf.decode().strip(), s.getsockname()[1], flush=True)
        s.close()
""")

FORGED = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], 9000), timeout=10)
    try:
        s.sendall(b"PROXY TCP4 203.0.113.9 198.18.2.2 4444 9000\\r\\nwho\\n")
        got = s.recv(4096)
    except ConnectionResetError:
        got = b""
    print("got", repr(got), flush=True)
""")

HAPROXY = textwrap.dedent("""
    global
        maxconn 200
    defaults
        mode tcp
        timeout connect 2s
        timeout client 10s
        timeout server 10s
    frontend fe
        bind 198.18.1.1:9000
        default_backend be
    backend be
        balance roundrobin
        server s1 198.18.2.2:9000 send-proxy-v2
        server s2 198.18.3.2:9000 send-proxy-v2
""")


@pytest.fixture
def network():
    with balancer_network(["be1", "be2"]) as net:
        net.link("cli", "198.18.4.2", "be1", "198.18.4.1")   # around the balancer
        yield net


def test_handlers_see_the_client_through_haproxy_and_forged_headers_are_refused(network, tmp_path):
    (tmp_path / "backend.py").write_text(BACKEND)
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "forged.py").write_text(FORGED)
    (tmp_path / "haproxy.cfg").write_text(HAPROXY)
    be1 = network.python("be1", [str(tmp_path / "backend.py"), "be1", "198.18.2.1/32"], tmp_path)
    be2 = network.python("be2", [str(tmp_path / "backend.py"), "be2", "198.18.3.1/32"], tmp_path)
    be1.wait_line("^ready$")
    be2.wait_line("^ready$")
    lb = network.spawn("lb", ["haproxy", "-f", str(tmp_path / "haproxy.cfg"), "-db"], tmp_path)

    client = None
    for _ in range(50):   # until HAProxy listens
        client = network.python("cli", [str(tmp_path / "client.py"), "198.18.1.1", "9000", "10"],
                                tmp_path)
        if client.wait(30) == 0:
            break
        time.sleep(0.1)
    assert client is not None and client.proc.returncode == 0, client.stderr() if client else ""
    seen = set()
    for line in client.lines:
        backend, host, port, via, balancer, local_port = line.split()
        assert host == "198.18.1.2"            # the client itself, not HAProxy
        assert port == local_port              # its own port, too
        assert balancer == {"be1": "198.18.2.1", "be2": "198.18.3.1"}[backend]
        seen.add(backend)
    assert len(client.lines) == 10 and seen == {"be1", "be2"}

    forged = network.python("cli", [str(tmp_path / "forged.py"), "198.18.4.1"], tmp_path)
    assert forged.wait(30) == 0
    assert forged.lines == ["got b''"]          # refused: no reply, whatever it claimed

    for child in (be1, be2):
        child.signal(signal.SIGINT)
        assert child.wait(20) == 0
    stats = {name: json.loads(child.lines[-1]) for name, child in (("be1", be1), ("be2", be2))}
    assert stats["be1"]["proxy_errors"] == 1 and stats["be2"]["proxy_errors"] == 0
    assert stats["be1"]["messages"] + stats["be2"]["messages"] == 10
    lb.kill()
