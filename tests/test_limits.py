"""Invariant 4 (bounded memory, backpressure that never drops) and the
connection limit."""

import random
import select
import time

import pytest

import pollpool
from conftest import (LINE, Client, Closed, assert_same_stream, exchange_many, py_echo,
                      rss_bytes, wait_for)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def slow_echo(msg):
    time.sleep(0.00002)
    return msg


@pytest.mark.parametrize("handler", [pollpool.handlers.echo, py_echo, slow_echo],
                         ids=["native", "python", "python-slow"])
def test_client_that_never_reads_cannot_grow_server_memory(make_server, handler):
    """A client pushes requests without reading a single reply. The server must
    stop reading it once output piles up (output_high_water), so what it holds
    stays near high-water + one input buffer + one task's replies (about
    2.5 MiB here; the limit is 8 MiB); nothing is dropped once the client
    reads. The slow handler keeps a task in flight nearly all the time, so
    input is always waiting when one completes."""
    srv = make_server(handler, output_high_water=256 * 1024)
    c = Client(srv.address, rcvbuf=256 * 1024, sndbuf=256 * 1024)
    try:
        rss_before = rss_bytes()
        line = b"%07d" + b"." * 1016 + b"\n"  # 1 KiB messages
        block = b"".join(line % i for i in range(64))  # 64 KiB
        pushed = 0
        cap = 160 * MiB
        give_up = time.monotonic() + 3.0  # a server still reading by then has lost the bound
        c.sock.setblocking(False)
        while pushed < cap and time.monotonic() < give_up:
            try:
                n = c.sock.send(block)
            except BlockingIOError:
                _, writable, _ = select.select([], [c.sock], [], 0.5)
                if not writable:
                    break  # stalled for 0.5 s: the server stopped reading us
                continue
            pushed += n
            if n < len(block):
                block = block[n:] + block[:n]  # keep the stream a whole number of blocks
        st = srv.stats()
        # Read by the server but not yet sent: its input and output buffers.
        held = st["bytes_in"] - st["bytes_out"]
        grown = rss_bytes() - rss_before
        assert held < 8 * MiB, \
            f"server holds {held / MiB:.1f} MiB for a client that does not read (RSS +{grown >> 20} MiB)"
        assert grown < 64 * MiB, f"server RSS grew by {grown >> 20} MiB"
        # Kernel buffers (autotuned up to tcp_rmem/tcp_wmem) hold the rest.
        assert pushed < 96 * MiB, f"server kept reading: {pushed >> 20} MiB accepted"
        # Now read everything back: every whole message pushed is echoed, in
        # order (a trailing partial message, if any, stays unanswered).
        whole = pushed - pushed % len(line % 0)
        c.sock.setblocking(True)
        c.sock.settimeout(20)
        got = c.recv_exactly(whole)
        assert got == (b"".join(line % i for i in range(64)) * (whole // (64 * 1024) + 2))[:whole]
    finally:
        c.close()
    assert srv.stats()["write_errors"] == 0


def test_full_task_queue_stops_reading_and_drops_nothing(make_server):
    def slow(msg):
        time.sleep(0.0002)
        return msg

    srv = make_server(slow, threads=1, queue_size=2)
    payloads = [LINE.frames([b"q%d-%d" % (c, i) for i in range(300)]) for c in range(20)]
    got = exchange_many(srv.address, payloads, [len(p) for p in payloads], chunk=2048,
                        rng=random.Random(7), timeout=50)
    for c, (g, p) in enumerate(zip(got, payloads)):
        assert_same_stream(g, p, LINE, f"client {c}")
    wait_for(lambda: srv.stats()["messages"] >= 20 * 300, 10)  # counters lag the replies
    assert srv.stats()["messages"] == 20 * 300


def test_max_connections_pauses_accepting_until_one_closes(make_server, connect):
    srv = make_server(pollpool.handlers.echo, max_connections=2)
    c1, c2 = connect(srv), connect(srv)
    assert c1.exchange([b"one"]) == [b"one"]
    assert c2.exchange([b"two"]) == [b"two"]
    c3 = connect(srv)  # completes in the kernel's backlog
    c3.send(b"three\n")
    time.sleep(0.3)
    st = srv.stats()
    assert st["accepted"] == 2 and st["active"] == 2, st
    c1.close()
    assert c3.recv_message() == b"three"  # accepted once a slot freed
    st = srv.stats()
    assert st["accepted"] == 3 and st["active"] <= 2, st
    assert st["accept_paused"] >= 1
    assert c2.exchange([b"two again"]) == [b"two again"]


@pytest.mark.timeout(90)
def test_fd_exhaustion_does_not_spin_or_kill_the_server(spawn, tmp_path):
    """With RLIMIT_NOFILE lowered, connections beyond the limit wait; the I/O
    thread must not spin (CPU time stays low) and service resumes when fds free up."""
    script = tmp_path / "emfile.py"
    script.write_text(r'''
import resource, socket, sys, time, pollpool
srv = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0, threads=2)
srv.start()
used = len(__import__("os").listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, used + 8))
print("pollpool listening on %s:%d" % srv.address[:2], flush=True)
time.sleep(3600)
''')
    child = spawn([str(script)])
    address = child.wait_listening()
    clients = []
    try:
        for i in range(30):
            clients.append(Client(address))
        for c in clients:
            c.send(b"hi\n")
        served = sum(1 for c in clients[:4] if c.recv_message() == b"hi")
        assert served == 4
        cpu_before = _cpu_seconds(child.pid)
        time.sleep(1.0)
        cpu_used = _cpu_seconds(child.pid) - cpu_before
        assert cpu_used < 0.5, f"server burned {cpu_used:.2f}s of CPU in 1s while out of fds"
        for c in clients[:10]:
            c.close()
        # The waiting clients are served once fds free up (or, with a
        # reserve-fd policy, refused with a close) -- none is left hanging.
        answered = refused = 0
        for c in clients[10:]:
            try:
                assert c.recv_message() == b"hi"
                answered += 1
            except Closed:
                refused += 1
            c.close()
        assert answered + refused == 20
        assert child.proc.poll() is None
        fresh = Client(address)
        clients.append(fresh)
        assert fresh.exchange([b"fresh"]) == [b"fresh"]
    finally:
        for c in clients:
            c.close()


def _cpu_seconds(pid: int) -> float:
    import os
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
