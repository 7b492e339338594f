"""Shared fixtures and helpers for the pollpool test suite.

Everything here talks to servers on 127.0.0.1 (or ::1) only, and every server,
socket and subprocess a fixture hands out is stopped, closed or killed in its
teardown, whatever the test did.
"""

from __future__ import annotations

import os
import queue
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pollpool

#: Every test runs once per I/O backend: a server built without backend=
#: (in this process or in a CLI subprocess) takes it from $POLLPOOL_BACKEND.
BACKENDS = ("poll", "epoll") if sys.platform.startswith("linux") else ("poll",)


@pytest.fixture(autouse=True, params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("POLLPOOL_BACKEND", request.param)
    return request.param


def pytest_configure(config):
    # A test run started in the background of a non-interactive shell
    # inherits SIGINT ignored, and so would every child: a Python started so
    # keeps it ignored, and the Ctrl+C tests would test the launcher, not
    # pollpool.  Children inherit a handled signal as the default instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        config._pollpool_sigint_ignored = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers",
        "soak: long randomized load tests (POLLPOOL_SOAK_SECONDS, default 30); "
        "run by default and by .ci/run, deselect with -m 'not soak'")


def pytest_unconfigure(config):
    if getattr(config, "_pollpool_sigint_ignored", False):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


#: Default socket timeout of test clients, in seconds: long enough for a loaded
#: 2-core machine, short enough that a missing reply fails the test quickly.
CLIENT_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# Client-side framing
# --------------------------------------------------------------------------


class Framer:
    """The client's view of one framing: builds requests and cuts replies.

    ``server_framing()`` gives the matching ``framing=`` argument for
    ``pollpool.Server``; replies are framed like requests, so the same object
    cuts both.
    """

    def __init__(self, kind: str, delimiter: bytes = b"\n", header_bytes: int = 4):
        assert kind in ("raw", "line", "length")
        self.kind = kind
        self.delimiter = delimiter
        self.header_bytes = header_bytes

    def __repr__(self) -> str:
        if self.kind == "line":
            return f"line{self.delimiter!r}"
        if self.kind == "length":
            return f"length{self.header_bytes}"
        return "raw"

    @property
    def max_payload(self) -> int:
        """Largest message this framing can carry (by its header width)."""
        if self.kind == "length":
            return min((1 << (8 * self.header_bytes)) - 1, 1 << 20)
        return 1 << 20

    def server_framing(self, max_size: int | None = None):
        """The framing argument for pollpool.Server matching this framer."""
        if self.kind == "raw":
            return "raw" if max_size is None else pollpool.Raw(max_size=max_size)
        if self.kind == "line":
            if self.delimiter == b"\n" and max_size is None:
                return "line"
            kw = {"delimiter": self.delimiter}
            if max_size is not None:
                kw["max_size"] = max_size
            return pollpool.Lines(**kw)
        if self.header_bytes == 4 and max_size is None:
            return "length"
        kw = {"header_bytes": self.header_bytes}
        if max_size is None and self.header_bytes < 4:
            # Explicit, so that these tests do not depend on how the default
            # max_size is fitted to a narrow header (tested on its own).
            max_size = self.max_payload
        if max_size is not None:
            kw["max_size"] = max_size
        return pollpool.LengthPrefixed(**kw)

    def frame(self, msg: bytes) -> bytes:
        if self.kind == "line":
            assert self.delimiter not in msg, "test bug: message holds the delimiter"
            return bytes(msg) + self.delimiter
        if self.kind == "length":
            return len(msg).to_bytes(self.header_bytes, "big") + bytes(msg)
        return bytes(msg)

    def frames(self, msgs) -> bytes:
        return b"".join(self.frame(m) for m in msgs)

    def cut_one(self, buf) -> tuple[bytes, int] | None:
        """(message, bytes consumed) for the first whole frame in buf, or None."""
        if self.kind == "line":
            i = buf.find(self.delimiter)  # bytes or bytearray
            if i < 0:
                return None
            return bytes(buf[:i]), i + len(self.delimiter)
        if self.kind == "length":
            h = self.header_bytes
            if len(buf) < h:
                return None
            n = int.from_bytes(bytes(buf[:h]), "big")
            if len(buf) < h + n:
                return None
            return bytes(buf[h:h + n]), h + n
        raise AssertionError("raw framing has no message boundaries")

    def split(self, data: bytes) -> tuple[list[bytes], bytes]:
        """All whole frames in data and the remainder."""
        out = []
        pos = 0
        if self.kind == "line":
            d = self.delimiter
            while True:
                i = data.find(d, pos)
                if i < 0:
                    break
                out.append(data[pos:i])
                pos = i + len(d)
            return out, data[pos:]
        while True:
            got = self.cut_one(memoryview(data)[pos:])
            if got is None:
                break
            out.append(got[0])
            pos += got[1]
        return out, data[pos:]


RAW = Framer("raw")
LINE = Framer("line")
CRLF = Framer("line", b"\r\n")
LENGTH1 = Framer("length", header_bytes=1)
LENGTH2 = Framer("length", header_bytes=2)
LENGTH4 = Framer("length", header_bytes=4)
LENGTH8 = Framer("length", header_bytes=8)


def frame_line(msg: bytes, delimiter: bytes = b"\n") -> bytes:
    return Framer("line", delimiter).frame(msg)


def frame_length(msg: bytes, header_bytes: int = 4) -> bytes:
    return Framer("length", header_bytes=header_bytes).frame(msg)


def unframe_lines(data: bytes, delimiter: bytes = b"\n") -> tuple[list[bytes], bytes]:
    return Framer("line", delimiter).split(data)


def unframe_lengths(data: bytes, header_bytes: int = 4) -> tuple[list[bytes], bytes]:
    return Framer("length", header_bytes=header_bytes).split(data)


def py_echo(msg):
    """The plain Python echo handler."""
    return msg


# --------------------------------------------------------------------------
# A client that reads exactly
# --------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection before the expected bytes arrived."""

    def __init__(self, received: bytes):
        super().__init__(f"connection closed after {len(received)} bytes: {received[-200:]!r}")
        self.received = received


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Client:
    """A blocking TCP client with a read buffer and a socket timeout."""

    def __init__(self, address, framer: Framer = LINE, timeout: float = CLIENT_TIMEOUT,
                 rcvbuf: int | None = None, sndbuf: int | None = None):
        self.framer = framer
        if isinstance(address, str):   # a Unix socket's path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = address
        else:
            host, port = address[0], address[1]
            self.sock = socket.socket(_family(host), socket.SOCK_STREAM)
            target = (host, port)
        try:
            if rcvbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if sndbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            self.sock.settimeout(timeout)
            self.sock.connect(target)
            if self.sock.family != socket.AF_UNIX:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.sock.close()
            raise
        self.buf = bytearray()

    # sending
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_messages(self, msgs) -> None:
        self.sock.sendall(self.framer.frames(msgs))

    def send_slowly(self, data: bytes, step: int = 1, pause: float = 0.001) -> None:
        """Sends data a few bytes at a time with a pause after each piece."""
        for i in range(0, len(data), step):
            self.sock.sendall(data[i:i + step])
            time.sleep(pause)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    # receiving
    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed(bytes(self.buf))
        self.buf += chunk

    def recv_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv_message(self) -> bytes:
        while True:
            got = self.framer.cut_one(self.buf)
            if got is not None:
                msg, used = got
                del self.buf[:used]
                return msg
            self._fill()

    def recv_messages(self, n: int) -> list[bytes]:
        return [self.recv_message() for _ in range(n)]

    def recv_until_closed(self) -> bytes:
        """Everything until EOF (or a reset); socket.timeout if it never closes."""
        while True:
            try:
                self._fill()
            except Closed as e:
                self.buf.clear()
                return e.received

    def exchange(self, msgs) -> list[bytes]:
        self.send_messages(msgs)
        return self.recv_messages(len(msgs))

    def close(self) -> None:
        self.sock.close()


def wait_closed(client: Client, timeout: float = CLIENT_TIMEOUT) -> bytes:
    client.sock.settimeout(timeout)
    return client.recv_until_closed()


# --------------------------------------------------------------------------
# Many connections at once
# --------------------------------------------------------------------------


def exchange_many(address, payloads: list[bytes], expect: list[int] | None = None,
                  *, half_close: bool = False, chunk: int | None = None,
                  timeout: float = 60.0, rng=None) -> list[bytes]:
    """Drives one connection per payload from a single thread with a selector.

    Each payload is sent pipelined (never waiting for replies), in pieces of at
    most ``chunk`` bytes (random sizes if ``rng`` is given) while replies are
    read. With ``expect``, reading a connection stops once that many bytes came;
    with ``half_close`` the write side is shut after the payload and reading
    goes on until EOF. Returns the bytes received per connection.
    """
    assert expect is not None or half_close
    host, port = address[0], address[1]
    sel = selectors.DefaultSelector()
    socks = []
    out_pos = [0] * len(payloads)
    received = [bytearray() for _ in payloads]
    done = [False] * len(payloads)
    try:
        for i in range(len(payloads)):
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(CLIENT_TIMEOUT)
            s.connect((host, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
        deadline = time.monotonic() + timeout
        while not all(done):
            left = deadline - time.monotonic()
            if left <= 0:
                status = [(i, out_pos[i], len(payloads[i]), len(received[i]))
                          for i in range(len(payloads)) if not done[i]]
                raise AssertionError(f"exchange_many timed out; (conn, sent, to send, received): {status[:10]}")
            for key, ev in sel.select(min(left, 1.0)):
                i = key.data
                s = key.fileobj
                if ev & selectors.EVENT_WRITE and out_pos[i] < len(payloads[i]):
                    n = chunk or (1 << 16)
                    if rng is not None:
                        n = rng.randint(1, n)
                    try:
                        sent = s.send(payloads[i][out_pos[i]:out_pos[i] + n])
                    except BlockingIOError:
                        sent = 0
                    out_pos[i] += sent
                    if out_pos[i] == len(payloads[i]):
                        if half_close:
                            s.shutdown(socket.SHUT_WR)
                        sel.modify(s, selectors.EVENT_READ, i)
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if data:
                        received[i] += data
                    # EOF (or reset) ends a connection early too: the caller's
                    # comparison of what came shows what is missing.
                    if not data or (expect is not None and not half_close
                                    and len(received[i]) >= expect[i]):
                        done[i] = True
                        sel.unregister(s)
        return [bytes(r) for r in received]
    finally:
        sel.close()
        for s in socks:
            s.close()


def assert_same_stream(got: bytes, expected: bytes, framer: Framer = LINE, label: str = "") -> None:
    """Compares two reply streams and, if they differ, names the first differing message."""
    if got == expected:
        return
    g, grest = framer.split(got) if framer.kind != "raw" else ([got], b"")
    e, erest = framer.split(expected) if framer.kind != "raw" else ([expected], b"")
    for i, (a, b) in enumerate(zip(g, e)):
        if a != b:
            raise AssertionError(
                f"{label}: reply #{i} is {a[:80]!r}, expected {b[:80]!r} "
                f"(got {len(g)} replies, expected {len(e)}; next got: {[x[:40] for x in g[i:i + 4]]})")
    raise AssertionError(
        f"{label}: got {len(g)} replies (+{len(grest)} trailing bytes {grest[:80]!r}), "
        f"expected {len(e)} (+{len(erest)} bytes); last got: {[x[:40] for x in g[-3:]]}")


# --------------------------------------------------------------------------
# Process facts
# --------------------------------------------------------------------------


def proc_status_kib(key: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    return proc_status_kib("VmRSS") * 1024


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_count() -> int:
    return len(os.listdir("/proc/self/task"))


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Polls predicate until it returns a true value or timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_stat(srv, key: str, at_least: int, timeout: float = 5.0) -> int:
    """Waits until srv.stats()[key] >= at_least; returns the last value seen."""
    wait_for(lambda: srv.stats()[key] >= at_least, timeout)
    return srv.stats()[key]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# Fixtures: servers and clients
# --------------------------------------------------------------------------


@pytest.fixture
def make_server():
    """Factory: make_server(handler=echo, **options) -> a started Server on an
    ephemeral port of 127.0.0.1. Every server made is stopped in teardown."""
    servers = []

    def factory(handler=None, **options):
        options.setdefault("host", "127.0.0.1")
        options.setdefault("port", 0)
        srv = pollpool.Server(pollpool.handlers.echo if handler is None else handler, **options)
        srv.start()
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        try:
            srv.stop(timeout=10)
        except Exception:  # already stopped by the test
            pass


@pytest.fixture
def connect():
    """Factory: connect(server_or_address, framer=LINE, timeout=...) -> Client.
    Every client made is closed in teardown."""
    clients = []

    def factory(target, framer: Framer = LINE, **kw):
        address = target.address if hasattr(target, "address") else target
        c = Client(address, framer, **kw)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.close()


# --------------------------------------------------------------------------
# Fixtures: subprocesses
# --------------------------------------------------------------------------

LISTENING_RE = re.compile(r"pollpool listening on \[?([0-9A-Za-z.:%-]+?)\]?:(\d+)\s*$")


def subprocess_env() -> dict:
    """The environment for child Pythons: unbuffered, and able to import the
    same pollpool this process imported."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    pkg_parent = str(Path(pollpool.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    return env


class Child:
    """A subprocess whose stdout lines are collected by a reader thread."""

    def __init__(self, args, cwd, env=None, stderr_path: Path | None = None):
        self.args = args
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=cwd, env=env or subprocess_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, pattern: str | re.Pattern, timeout: float = 20.0) -> re.Match:
        """Waits for a stdout line matching pattern (re.search); returns the match."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        for line in list(self.lines):
            m = rx.search(line)
            if m:
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {rx.pattern!r} within {timeout}s; "
                                     f"stdout: {self.lines!r}; stderr: {self.stderr()[-2000:]}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                raise AssertionError(f"process exited ({self.proc.returncode}) before a line matching "
                                     f"{rx.pattern!r}; stdout: {self.lines!r}; stderr: {self.stderr()[-2000:]}")
            m = rx.search(line)
            if m:
                return m

    def wait_listening(self, timeout: float = 20.0) -> tuple[str, int]:
        m = self.wait_line(LISTENING_RE, timeout)
        return m.group(1), int(m.group(2))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Waits for exit; fails the test (killing the child) if it takes longer."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"process did not exit within {timeout}s; stdout: {self.lines[-20:]!r}; "
                                 f"stderr: {self.stderr()[-2000:]}") from None
        self._reader.join(5)
        return rc

    def stderr(self) -> str:
        if not self.stderr_path:
            return ""
        try:
            self._stderr.flush()
        except Exception:
            pass
        return Path(self.stderr_path).read_text("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()


@pytest.fixture
def spawn(tmp_path):
    """Factory: spawn(args_after_python, cwd=tmp_path) -> Child running
    ``sys.executable *args``. Every child is killed in teardown."""
    children = []

    def factory(args, cwd=None, env=None):
        n = len(children)
        child = Child([sys.executable, *args], cwd=cwd or tmp_path, env=env,
                      stderr_path=tmp_path / f"child{n}.stderr")
        children.append(child)
        return child

    yield factory
    for child in children:
        child.kill()


def connect_retry(address, framer: Framer = LINE, timeout: float = 20.0, **kw) -> Client:
    """Connects, retrying while the port refuses (a child still starting up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, framer, **kw)
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


CRASH_MARKERS = ("Fatal Python error", "Segmentation fault", "AddressSanitizer", "Aborted",
                 "core dumped", "double free", "corrupted")


def assert_no_crash_text(text: str) -> None:
    for marker in CRASH_MARKERS:
        assert marker not in text, f"child stderr shows {marker!r}:\n{text[-3000:]}"


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
