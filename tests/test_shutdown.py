"""Must show 6: graceful shutdown on a real SIGINT (and SIGTERM, and stop()).

Every message a client has fully sent before the signal is answered, in
order; then the shutdown message; then EOF; and the process exits 0 within
the drain timeout. A second SIGINT ends a stuck drain at once. After
serve_forever() returns, Python's own SIGINT handling is back.
"""

import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from conftest import (CRLF, LENGTH4, LINE, Client, assert_no_crash_text, assert_same_stream,
                      connect_retry, free_port, subprocess_env, wait_closed)

SERVE_SCRIPT = r'''
import json, os, signal, sys, time
import pollpool

port, mode, drain = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])

def handler(msg):
    if msg == b"stuck":
        print("handler-stuck", flush=True)
        time.sleep(30)
    return msg.upper()

srv = pollpool.Server(handler, host="127.0.0.1", port=port, threads=4, framing="line",
                      drain_timeout=drain, shutdown_message=b"BYE")
print("serving", flush=True)
stats = srv.serve_forever()
print("served " + json.dumps(stats, default=str), flush=True)
if mode == "stuck":
    sys.exit(0)
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    print("python-handler-intact", flush=True)
try:
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.01)
    print("no-keyboard-interrupt", flush=True)
except KeyboardInterrupt:
    print("keyboard-interrupt-restored", flush=True)
'''


def write_script(tmp_path):
    path = tmp_path / "serve.py"
    path.write_text(SERVE_SCRIPT)
    return str(path)


class PipeliningClient:
    """Sends numbered lines in batches, keeping at most WINDOW unanswered, until
    told to stop; a reader thread collects everything until EOF."""

    BATCH = 50
    WINDOW = 2000

    def __init__(self, cid: int, port: int, stop: threading.Event):
        self.cid = cid
        self.stop = stop
        self.client = connect_retry(("127.0.0.1", port), LINE, timeout=20)
        self.client.sock.settimeout(30)
        self.sent = 0            # messages fully sent (sendall returned)
        self.received = 0        # replies seen so far (newline count)
        self.data = bytearray()
        self.reset = False
        self.error = None
        self.sender = threading.Thread(target=self._send, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)

    def message(self, i: int) -> bytes:
        return b"m%d:%d" % (self.cid, i)

    def start(self):
        self.reader.start()
        self.sender.start()

    def _send(self):
        try:
            while not self.stop.is_set():
                if self.sent - self.received > self.WINDOW:
                    time.sleep(0.0005)
                    continue
                batch = [self.message(i) for i in range(self.sent, self.sent + self.BATCH)]
                self.client.sock.sendall(LINE.frames(batch))
                self.sent += self.BATCH
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = e

    def _read(self):
        try:
            while True:
                try:
                    chunk = self.client.sock.recv(1 << 16)
                except ConnectionResetError:
                    self.reset = True
                    return
                if not chunk:
                    return
                self.data += chunk
                self.received += chunk.count(b"\n")
        except Exception as e:  # noqa: BLE001
            self.error = e

    def expected(self) -> bytes:
        return LINE.frames([self.message(i).upper() for i in range(self.sent)]) + b"BYE\n"


@pytest.mark.timeout(120)
def test_sigint_answers_every_sent_message_then_goodbye_then_eof(spawn, tmp_path):
    drain = 10.0
    port = free_port()
    child = spawn([write_script(tmp_path), str(port), "load", str(drain)])
    child.wait_line("^serving$")
    stop = threading.Event()
    clients = [PipeliningClient(i, port, stop) for i in range(20)]
    try:
        for c in clients:
            c.start()
        time.sleep(1.0)  # pipelined load
        stop.set()
        for c in clients:
            c.sender.join(20)
            assert not c.sender.is_alive(), "a sender is stuck: the server stopped reading"
        pending = sum(c.sent - c.received for c in clients)
        signaled = time.monotonic()
        child.signal(signal.SIGINT)
        for c in clients:
            c.reader.join(drain + 10)
        served_line = child.wait_line(r"^served ", timeout=drain + 5)
        drained_in = time.monotonic() - signaled
        rc = child.wait(10)
        for c in clients:
            assert c.error is None, f"client {c.cid}: {c.error!r}"
            assert not c.reader.is_alive(), f"client {c.cid} never got EOF"
            assert c.sent > 0
            assert_same_stream(bytes(c.data), c.expected(), LINE,
                               f"client {c.cid} (sent {c.sent}, reset={c.reset}, pending at signal {pending})")
        assert rc == 0, child.stderr()
        assert drained_in < drain, f"drain took {drained_in:.1f}s"
        stats = json.loads(served_line.string[len("served "):])
        assert stats["messages"] == sum(c.sent for c in clients)
        assert stats["forced_closes"] == 0
        assert "keyboard-interrupt-restored" in child.lines, child.lines[-5:]
        assert_no_crash_text(child.stderr())
    finally:
        stop.set()
        for c in clients:
            c.client.close()


@pytest.mark.timeout(60)
def test_sigterm_drains_like_sigint(spawn, tmp_path):
    port = free_port()
    child = spawn([write_script(tmp_path), str(port), "load", "10"])
    c = connect_retry(("127.0.0.1", port))
    idle = connect_retry(("127.0.0.1", port))
    try:
        msgs = [b"t%d" % i for i in range(500)]
        c.send(LINE.frames(msgs))
        assert c.recv_message() == b"T0"
        child.signal(signal.SIGTERM)
        assert_same_stream(wait_closed(c), LINE.frames([m.upper() for m in msgs[1:]]) + b"BYE\n", LINE, "sigterm")
        assert wait_closed(idle) == b"BYE\n"
        assert child.wait(15) == 0
        assert "keyboard-interrupt-restored" in child.lines
    finally:
        c.close()
        idle.close()


@pytest.mark.timeout(60)
def test_second_sigint_during_stuck_drain_exits_promptly(spawn, tmp_path):
    port = free_port()
    child = spawn([write_script(tmp_path), str(port), "stuck", "60"])
    c = connect_retry(("127.0.0.1", port))
    try:
        assert c.exchange([b"hello"]) == [b"HELLO"]
        c.send(b"stuck\n")
        child.wait_line("^handler-stuck$")
        child.signal(signal.SIGINT)
        time.sleep(1.0)
        # The drain waits for the message in flight (drain timeout is 60 s).
        assert child.proc.poll() is None, "graceful drain gave up on a message in flight"
        child.signal(signal.SIGINT)
        started = time.monotonic()
        rc = child.wait(5)
        assert time.monotonic() - started < 5
        assert rc >= 0, f"killed by signal {-rc}; stderr: {child.stderr()[-2000:]}"
        assert any(line.startswith("served ") for line in child.lines), child.lines
        assert_no_crash_text(child.stderr())
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_drain_timeout_bounds_a_stuck_drain(spawn, tmp_path):
    port = free_port()
    child = spawn([write_script(tmp_path), str(port), "stuck", "1.0"])
    c = connect_retry(("127.0.0.1", port))
    try:
        c.send(b"stuck\n")
        child.wait_line("^handler-stuck$")
        started = time.monotonic()
        child.signal(signal.SIGINT)
        stats = served_stats_within(child, 6)
        assert time.monotonic() - started < 6
        assert stats["forced_closes"] >= 1
        rc = child.wait(5)
        assert rc >= 0, child.stderr()[-2000:]
        assert_no_crash_text(child.stderr())
    finally:
        c.close()


def served_stats_within(child, timeout):
    line = child.wait_line(r"^served ", timeout=timeout).string
    return json.loads(line[len("served "):])


# -- in-process graceful stop -------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framer", [LINE, CRLF, LENGTH4], ids=repr)
def test_stop_answers_pending_messages_then_sends_shutdown_message(make_server, connect, framer):
    def handler(msg):
        time.sleep(0.001)
        return msg.upper()

    srv = make_server(handler, threads=4, framing=framer.server_framing(), shutdown_message=b"BYE")
    idle = connect(srv, framer)
    busy = [connect(srv, framer) for _ in range(5)]
    assert idle.exchange([b"x"]) == [b"X"]
    sent = []
    for i, c in enumerate(busy):
        msgs = [b"c%d-%d" % (i, j) for j in range(200)]
        c.send(framer.frames(msgs))
        sent.append(msgs)
    stats = srv.stop(timeout=30)
    assert isinstance(stats, dict)
    for c, msgs in zip(busy, sent):
        assert_same_stream(wait_closed(c), framer.frames([m.upper() for m in msgs] + [b"BYE"]),
                           framer, "busy client")
    assert wait_closed(idle) == framer.frame(b"BYE")
    assert stats["messages"] == 1 + 5 * 200
    assert stats["active"] == 0


@pytest.mark.timeout(30)
def test_stop_without_shutdown_message_just_closes(make_server, connect):
    srv = make_server()
    port = srv.address[1]
    c = connect(srv)
    assert c.exchange([b"a"]) == [b"a"]
    c.send(b"b\nc\n")
    srv.stop(timeout=10)
    assert wait_closed(c) == b"b\nc\n"
    with pytest.raises(ConnectionRefusedError):  # the listener is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shutdown_message", [None, b"BYE"])
def test_graceful_stop_does_not_wait_for_idle_clients(make_server, connect, shutdown_message):
    """Idle connections owe nothing: the drain closes them at once instead of
    waiting out the drain timeout."""
    srv = make_server(drain_timeout=20.0, shutdown_message=shutdown_message)
    idle = [connect(srv) for _ in range(3)]
    for c in idle:
        assert c.exchange([b"hi"]) == [b"hi"]
    started = time.monotonic()
    stats = srv.stop()
    took = time.monotonic() - started
    assert took < 5.0, f"stop() took {took:.1f}s with only idle clients"
    for c in idle:
        assert wait_closed(c) == (b"" if shutdown_message is None else b"BYE\n")
    assert stats["forced_closes"] == 0


# -- the CLI ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_prints_address_serves_echo_and_exits_0_on_sigint(spawn):
    child = spawn(["-m", "pollpool", "--port", "0", "--threads", "2"])
    host, port = child.wait_listening()
    assert host == "127.0.0.1" and port != 0
    c = Client((host, port))
    try:
        assert c.exchange([b"hello", b"", b"bytes \x00\xff"]) == [b"hello", b"", b"bytes \x00\xff"]
        n_lines = len(child.lines)
        child.signal(signal.SIGINT)
        assert wait_closed(c) == b""
        assert child.wait(15) == 0, child.stderr()[-2000:]
        after = "\n".join(child.lines[n_lines:])
        assert "accepted" in after and "messages" in after, f"no stats printed on exit: {after!r}"
        assert_no_crash_text(child.stderr())
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_cli_module_handler_length_framing_limits_and_shutdown_message(spawn, tmp_path):
    (tmp_path / "myhandlers.py").write_text("def shout(msg):\n    return msg.upper()\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    child = spawn(["-m", "pollpool", "--port", "0", "--framing", "length:4",
                   "--handler", "myhandlers:shout", "--max-message-size", "100",
                   "--max-connections", "10", "--drain-timeout", "5",
                   "--shutdown-message", "BYE"], env=env)
    address = child.wait_listening()
    c = Client(address, LENGTH4)
    bad = Client(address, LENGTH4)
    try:
        assert c.exchange([b"abc", b"x" * 100]) == [b"ABC", b"X" * 100]
        bad.send(LENGTH4.frame(b"y" * 101))
        closed = wait_closed(bad)
        assert b"Y" * 101 not in closed
        child.signal(signal.SIGINT)
        assert wait_closed(c) == LENGTH4.frame(b"BYE")
        assert child.wait(15) == 0, child.stderr()[-2000:]
    finally:
        c.close()
        bad.close()


@pytest.mark.timeout(60)
def test_cli_line_framing_with_crlf_delimiter(spawn):
    child = spawn(["-m", "pollpool", "--port", "0", "--framing", "line:\\r\\n", "--threads", "1"])
    address = child.wait_listening()
    c = Client(address, CRLF)
    try:
        assert c.exchange([b"a\nb", b"c\r", b""]) == [b"a\nb", b"c\r", b""]
        child.signal(signal.SIGINT)
        assert child.wait(15) == 0
    finally:
        c.close()


@pytest.mark.timeout(30)
def test_cli_help_lists_the_options():
    import subprocess
    out = subprocess.run([sys.executable, "-m", "pollpool", "--help"], capture_output=True,
                         timeout=20, env=subprocess_env(), cwd="/")
    assert out.returncode == 0
    text = out.stdout.decode()
    for option in ("--host", "--port", "--threads", "--framing", "--handler",
                   "--max-message-size", "--max-connections", "--drain-timeout",
                   "--shutdown-message", "--processes", "--backend"):
        assert option in text


THREAD_SCRIPT = r'''
import os, signal, threading, time, socket
import pollpool

srv = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0)
out = {}
t = threading.Thread(target=lambda: out.update(stats=srv.serve_forever()))
t.start()
while True:
    try:
        address = srv.address
        break
    except Exception:
        time.sleep(0.01)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(3)
    print("no-keyboard-interrupt", flush=True)
except KeyboardInterrupt:
    print("keyboard-interrupt", flush=True)
with socket.create_connection(address, timeout=5) as s:
    s.sendall(b"still serving\n")
    print("reply", s.recv(100), flush=True)
srv.stop(timeout=5)
t.join(5)
print("joined", not t.is_alive(), out["stats"]["messages"], flush=True)
'''


@pytest.mark.timeout(60)
def test_serve_forever_off_the_main_thread_leaves_signals_alone(spawn, tmp_path):
    """Only the main thread's serve_forever() takes SIGINT over; elsewhere
    Ctrl+C stays Python's KeyboardInterrupt and the server keeps serving."""
    script = tmp_path / "thread_serve.py"
    script.write_text(THREAD_SCRIPT)
    child = spawn([str(script)])
    assert child.wait(30) == 0, child.stderr()[-2000:]
    assert "keyboard-interrupt" in child.lines, child.lines
    assert "reply b'still serving\\n'" in child.lines, child.lines
    assert "joined True 1" in child.lines, child.lines


@pytest.mark.timeout(30)
def test_cli_reports_a_busy_port_and_exits_nonzero(spawn):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        child = spawn(["-m", "pollpool", "--port", str(port)])
        rc = child.wait(20)
    assert rc not in (0, None) and rc > 0
    assert "in use" in child.stderr().lower(), child.stderr()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args", [["--framing", "bogus"], ["--framing", "length:3"],
                                  ["--handler", "no_such_module_xyz:f"], ["--threads", "0"]],
                         ids=["framing", "header", "handler", "threads"])
def test_cli_rejects_bad_options(spawn, args):
    child = spawn(["-m", "pollpool", "--port", "0", *args])
    rc = child.wait(20)
    assert rc not in (0, None) and rc > 0
    assert not any(line.startswith("pollpool listening") for line in child.lines)
    assert child.stderr().strip(), "no error message"


@pytest.mark.timeout(60)
def test_stop_right_after_data_arrives_answers_it_without_waiting_for_the_timeout(make_server):
    """The drain dispatches what it reads at the stop itself; those tasks must
    reach a worker before the loop sleeps, or the drain waits out its timeout
    and cuts the connection (seen: 30 of 40 stops, before the fix)."""
    for i in range(20):
        srv = make_server(threads=4, drain_timeout=5.0)
        c = Client(srv.address, LINE)
        try:
            assert c.exchange([b"a"]) == [b"a"]
            c.send(b"b\nc\n")
            started = time.monotonic()
            stats = srv.stop(timeout=10)
            assert time.monotonic() - started < 2.5, f"stop {i} waited for the drain timeout"
            assert wait_closed(c) == b"b\nc\n"
            assert stats["forced_closes"] == 0 and stats["write_errors"] == 0
        finally:
            c.close()
