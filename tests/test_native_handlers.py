"""Native handlers users bring: a C file compiled at test time against
pollpool.get_include(), served with NativeHandler.from_library and through the
CLI; a handler compiled through cffi, served with from_pointer; PP_CLOSE,
errors, 16 MiB replies, ABI versions, connection hooks, and 8 workers under
load on the thread-safe example."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import pollpool
from conftest import LINE, Client, Framer, wait_closed, wait_for, wait_stat

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "native_c" / "counter.c"
LENGTH4 = Framer("length", header_bytes=4)


def cc() -> str:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    pytest.fail("no C compiler found: the native handler tests need one")


def build(tmp: Path, source: str | Path, name: str) -> Path:
    """Compiles source into tmp/lib<name>.so against pollpool.get_include()."""
    src = Path(source) if isinstance(source, Path) else tmp / f"{name}.c"
    if not isinstance(source, Path):
        src.write_text(source)
    out = tmp / f"lib{name}.so"
    subprocess.run([cc(), "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    "-I", pollpool.get_include(), "-o", str(out), str(src), "-pthread"],
                   check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def counter_lib(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("counter"), EXAMPLE, "counter")


def test_get_include_has_the_header():
    header = Path(pollpool.get_include()) / "pollpool.h"
    assert header.is_file()
    assert "POLLPOOL_ABI_VERSION" in header.read_text()


def test_from_library_serves_a_handler_compiled_at_test_time(make_server, counter_lib):
    h = pollpool.NativeHandler.from_library(str(counter_lib), "counter")
    srv = make_server(h, threads=4)
    c = Client(srv.address)
    try:
        hello = c.recv_message()
        assert hello.startswith(b"hello ")
        assert c.exchange([b"abc", b"Hello world", b""]) == [b"1 ABC", b"2 HELLO WORLD", b"3 "]
        # State is per connection: a second connection counts from 1 again.
        d = Client(srv.address)
        try:
            assert d.recv_message() != hello
            assert d.exchange([b"x"]) == [b"1 X"]
        finally:
            d.close()
        assert c.exchange([b"y"]) == [b"4 Y"]
    finally:
        c.close()


def test_pp_close_replies_then_closes(make_server, counter_lib):
    srv = make_server(pollpool.NativeHandler.from_library(counter_lib, "counter"))
    c = Client(srv.address)
    try:
        c.recv_message()
        c.send_messages([b"a", b"quit", b"never answered"])
        assert c.recv_messages(2) == [b"1 A", b"bye"]
        assert wait_closed(c) == b""
    finally:
        c.close()
    assert srv.stats()["handler_errors"] == 0


def test_negative_return_closes_that_connection_and_counts(make_server, counter_lib):
    srv = make_server(pollpool.NativeHandler.from_library(counter_lib, "counter"))
    bad, good = Client(srv.address), Client(srv.address)
    try:
        bad.recv_message(), good.recv_message()
        bad.send_messages([b"a", b"fail", b"b"])
        assert bad.recv_message() == b"1 A"
        assert wait_closed(bad) == b""
        assert good.exchange([b"still here"]) == [b"1 STILL HERE"]
        assert wait_stat(srv, "handler_errors", 1) == 1
    finally:
        bad.close(), good.close()


def test_a_16_mib_reply_and_an_empty_one(make_server, counter_lib):
    srv = make_server(pollpool.NativeHandler.from_library(counter_lib, "counter"),
                      framing="length")
    c = Client(srv.address, LENGTH4, timeout=30)
    try:
        assert c.recv_message().startswith(b"hello ")
        size = 16 << 20
        c.send_messages([b"big %d" % size, b"big 0", b"z"])
        big = c.recv_message()
        assert len(big) == size and big == b"x" * size
        assert c.recv_messages(2) == [b"", b"1 Z"]
    finally:
        c.close()


def test_abi_mismatch_is_refused_with_both_versions(tmp_path):
    lib = build(tmp_path, """
        #include <pollpool.h>
        __attribute__((visibility("default"))) const int pollpool_abi_version = 999;
        int h(void *ctx, const unsigned char *m, size_t n, pp_reply *r)
        { (void)ctx; return pp_reply_write(r, m, n); }
    """, "future")
    with pytest.raises(ImportError) as e:
        pollpool.NativeHandler.from_library(lib, "h")
    assert "999" in str(e.value) and str(pollpool.handlers.ABI_VERSION) in str(e.value)


def test_missing_library_and_symbol_say_which(tmp_path, counter_lib):
    with pytest.raises(OSError) as e:
        pollpool.NativeHandler.from_library(tmp_path / "nope.so", "x")
    assert "nope.so" in str(e.value)
    with pytest.raises(AttributeError) as e:
        pollpool.NativeHandler.from_library(counter_lib, "no_such_handler")
    assert "no_such_handler" in str(e.value) and str(counter_lib) in str(e.value)


def test_cli_serves_a_library_handler(spawn, counter_lib):
    child = spawn(["-m", "pollpool", "--port", "0", "--threads", "2",
                   "--handler", f"{counter_lib}:counter"], cwd=ROOT)
    host, port = child.wait_listening()
    c = Client((host, port))
    try:
        assert c.recv_message().startswith(b"hello ")
        assert c.exchange([b"cli"]) == [b"1 CLI"]
    finally:
        c.close()
    import signal
    child.signal(signal.SIGINT)
    assert child.wait(20) == 0


def test_hooks_bracket_every_connection_with_8_workers_under_load(make_server, counter_lib):
    """The example is thread-safe: 8 workers, 40 connections pipelining at
    once, each sees its own count from 1 in order; opens == closes at the end."""
    stats = ctypes.CDLL(str(counter_lib))
    stats.counter_opened.restype = stats.counter_closed.restype = ctypes.c_ulong
    opened0, closed0 = stats.counter_opened(), stats.counter_closed()
    srv = make_server(pollpool.NativeHandler.from_library(counter_lib, "counter"), threads=8)
    errors: list = []

    def client(k: int) -> None:
        rnd = random.Random(k)
        try:
            c = Client(srv.address, timeout=30)
            try:
                c.recv_message()
                n = 0
                for _ in range(10):
                    batch = [b"m%d-%d" % (k, n + i) for i in range(rnd.randint(1, 60))]
                    got = c.exchange(batch)
                    want = [b"%d M%d-%d" % (n + i + 1, k, n + i) for i in range(len(batch))]
                    if got != want:
                        errors.append((k, got[:3], want[:3]))
                        return
                    n += len(batch)
            finally:
                c.close()
        except Exception as e:  # reported below
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    srv.stop(timeout=10)
    assert stats.counter_opened() - opened0 == 40
    assert stats.counter_closed() - closed0 == 40


@pytest.fixture(scope="module")
def cffi_module(tmp_path_factory):
    """The cffi example (examples/native_cffi/build_handler.py), compiled at
    test time as a user's package would: its own FFI, pollpool.h included."""
    import importlib.util

    tmp = tmp_path_factory.mktemp("cffi_user")
    spec = importlib.util.spec_from_file_location(
        "pp_example_build", ROOT / "examples" / "native_cffi" / "build_handler.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    builder.ffi.compile(tmpdir=str(tmp))
    sys.path.insert(0, str(tmp))
    try:
        import _shout  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp))
    return _shout


def test_from_pointer_serves_a_cffi_compiled_handler(make_server, cffi_module):
    fn = cffi_module.ffi.addressof(cffi_module.lib, "shout")
    srv = make_server(pollpool.NativeHandler.from_pointer(fn), threads=8)
    c = Client(srv.address)
    try:
        assert c.exchange([b"quiet", b"x" * 1000]) == [b"QUIET", b"X" * 1000]
    finally:
        c.close()
    # An integer address works too (unchecked: the caller vouches for it).
    addr = int(cffi_module.ffi.cast("uintptr_t", fn))
    srv2 = make_server(pollpool.NativeHandler.from_pointer(addr))
    d = Client(srv2.address)
    try:
        assert d.exchange([b"int"]) == [b"INT"]
    finally:
        d.close()


def test_from_pointer_checks_the_signature():
    from cffi import FFI

    other = FFI()  # a user's FFI: types from another instance are checked too
    wrong = other.cast("int(*)(int)", 1)
    with pytest.raises(TypeError) as e:
        pollpool.NativeHandler.from_pointer(wrong)
    assert "pp_reply" in str(e.value)
    right = other.cast("int(*)(void *, const unsigned char *, size_t, void *)", 1)
    assert pollpool.NativeHandler.from_pointer(right) is not None
    with pytest.raises(ValueError):
        pollpool.NativeHandler.from_pointer(0)
