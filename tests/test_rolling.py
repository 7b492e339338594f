"""Rolling restarts behind a real HAProxy lose nothing.

On the network of tests/netns.py (client, balancer, two backends, on
198.18.0.0/15 inside namespaces this test makes): each backend runs pollpool
with processes=2, the PROXY protocol, a health listener and drain_delay;
HAProxy sends send-proxy-v2, health-checks the health listener (a TCP check
and the agent-check) and has `retries 0`, so that it hides no failure.
Under load (clients making a connection per request, and keep-alive
clients), every backend is restarted in turn (SIGTERM, then started again)
and every backend's children are replaced (SIGHUP).  Counted: failed
connections and lost requests (a keep-alive request is lost unless its
answer came, or the server's goodbye came before it).
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time

import pytest
from netns import balancer_network

pytestmark = pytest.mark.timeout(180)

BACKEND = textwrap.dedent("""
    import json, sys, pollpool
    name = sys.argv[1].encode()
    srv = pollpool.Server(lambda m: m, host="0.0.0.0", port=9000, processes=2, threads=2,
                          proxy_protocol=True, trusted_proxies=[sys.argv[2]],
                          health="0.0.0.0:9001", drain_delay=1.5, shutdown_message=b"bye",
                          backend="epoll")
    srv.serve_forever(on_ready=lambda: print("ready", flush=True))
    print(json.dumps(srv.stats()), flush=True)
""")

HAPROXY = textwrap.dedent("""
    global
        maxconn 2000
    defaults
        mode tcp
        retries 0
        timeout connect 2s
        timeout client 30s
        timeout server 30s
    frontend fe
        bind 198.18.1.1:9000
        default_backend be
    backend be
        balance roundrobin
        default-server send-proxy-v2 check port 9001 inter 200ms fall 1 rise 1 agent-check agent-port 9001 agent-inter 200ms
        server s1 198.18.2.2:9000
        server s2 198.18.3.2:9000
""")

CLIENT = textwrap.dedent("""
    import json, socket, sys, threading, time
    addr = (sys.argv[1], int(sys.argv[2]))
    t_start = time.monotonic()
    until = t_start + float(sys.argv[3])
    res = {"ok": 0, "failed": 0, "ka_answered": 0, "ka_lost": 0, "ka_goodbyes": 0,
           "errors": []}
    lock = threading.Lock()

    def note(k, err=None):
        with lock:
            res[k] += 1
            if err is not None and len(res["errors"]) < 1000:
                res["errors"].append(f"{time.monotonic() - t_start:.2f}s {err}")

    def per_request(i):
        n = 0
        while time.monotonic() < until:
            msg = b"r%d-%d" % (i, n)
            n += 1
            try:
                with socket.create_connection(addr, timeout=20) as s:
                    s.sendall(msg + b"\\n")
                    data = b""
                    while b"\\n" not in data:
                        chunk = s.recv(100)
                        if not chunk:
                            break
                        data += chunk
                if data.split(b"\\n", 1)[0] == msg:
                    note("ok")
                else:
                    note("failed", f"{msg!r} got {data!r}")
            except OSError as e:
                note("failed", f"{msg!r}: {e!r}")
            time.sleep(0.002)

    def keep_alive(i):
        n, s, buf = 0, None, b""
        while time.monotonic() < until:
            try:
                if s is None:
                    s = socket.create_connection(addr, timeout=20)
                    buf = b""
            except OSError as e:
                note("failed", f"keep-alive connect: {e!r}")
                time.sleep(0.01)
                continue
            msg = b"k%d-%d" % (i, n)
            try:
                s.sendall(msg + b"\\n")
                while b"\\n" not in buf:
                    chunk = s.recv(100)
                    if not chunk:
                        raise ConnectionResetError("EOF before an answer or a goodbye")
                    buf += chunk
            except OSError as e:
                note("ka_lost", f"{msg!r}: {e!r}")
                s.close()
                s, n = None, n + 1
                continue
            line, buf = buf.split(b"\\n", 1)
            if line == b"bye":
                note("ka_goodbyes")
                s.close()
                s = None
                continue          # told first: send the same request again
            note("ka_answered" if line == msg else "ka_lost")
            n += 1
            time.sleep(0.005)
        if s is not None:
            s.close()

    threads = [threading.Thread(target=per_request, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=keep_alive, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(res), flush=True)
""")


@pytest.fixture
def network():
    with balancer_network(["be1", "be2"]) as net:
        yield net


# One I/O backend is enough for a test of this length: epoll, what a
# deployment uses (set in BACKEND; this replaces conftest's poll/epoll pair).
@pytest.mark.parametrize("backend", ["epoll"])
def test_rolling_restarts_behind_haproxy_lose_nothing(network, tmp_path, backend):
    for name, text in (("backend.py", BACKEND), ("client.py", CLIENT), ("haproxy.cfg", HAPROXY)):
        (tmp_path / name).write_text(text)
    nets = {"be1": "198.18.2.1/32", "be2": "198.18.3.1/32"}

    def start(role):
        child = network.python(role, [str(tmp_path / "backend.py"), role, nets[role]], tmp_path)
        child.wait_line("^ready$")
        return child

    backends = {role: start(role) for role in ("be1", "be2")}
    lb = network.spawn("lb", ["haproxy", "-f", str(tmp_path / "haproxy.cfg"), "-db"], tmp_path)
    for _ in range(100):   # until HAProxy listens and sees both backends up
        probe = network.run("cli", [sys.executable, "-c",
                                    "import socket; s=socket.create_connection(('198.18.1.1',9000),2);"
                                    "s.sendall(b'p\\n'); assert s.recv(9)==b'p\\n'"])
        if probe.returncode == 0:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    duration = 16.0
    client = network.python("cli", [str(tmp_path / "client.py"), "198.18.1.1", "9000",
                                    str(duration)], tmp_path)
    t0 = time.monotonic()
    time.sleep(1.5)
    finals = []
    phases = []
    for role in ("be1", "be2"):                      # each backend in turn
        phases.append((f"SIGTERM {role}", round(time.monotonic() - t0, 2)))
        backends[role].signal(signal.SIGTERM)
        assert backends[role].wait(20) == 0, backends[role].stderr()[-2000:]
        finals.append(json.loads(backends[role].lines[-1]))
        phases.append((f"exited {role}", round(time.monotonic() - t0, 2)))
        backends[role] = start(role)
        phases.append((f"ready {role}", round(time.monotonic() - t0, 2)))
        time.sleep(1.5)                              # HAProxy sees it up (rise 1, 200 ms)
    for role in ("be1", "be2"):                      # every backend's children
        backends[role].signal(signal.SIGHUP)
        time.sleep(1.5)
    assert time.monotonic() - t0 < duration - 1, "the restarts took longer than the load"
    assert client.wait(duration + 60) == 0, client.stderr()[-3000:]
    res = json.loads(client.lines[-1])
    for role in ("be1", "be2"):
        backends[role].signal(signal.SIGINT)
        assert backends[role].wait(30) == 0
        finals.append(json.loads(backends[role].lines[-1]))
    lb.kill()
    res["errors"] = res["errors"][:10]     # when they happened, against the phases below
    assert res["failed"] == 0 and res["ka_lost"] == 0, (res, phases)
    assert res["ok"] > 500 and res["ka_answered"] > 200, res
    assert res["ka_goodbyes"] >= 2, res      # keep-alive clients were told and came back
    assert sum(f["restarts"] for f in finals) == 0
    assert all(f["proxy_errors"] == 0 for f in finals)
    print("rolling restarts:", res)
