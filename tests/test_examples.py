"""The examples work as their comments say: the chat server (Python,
connection-aware, publish and broadcast) and the native pub/sub handler (ABI
2: pushes from a handler and from a thread of its own); and a library built
for ABI 1 still loads and works."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import pollpool
from conftest import LINE, connect_retry, wait_closed
from test_native_handlers import build

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def messages_except_ticks(client, n: int) -> list[bytes]:
    out = []
    while len(out) < n:
        m = client.recv_message()
        if not m.startswith(b"tick "):
            out.append(m)
    return out


def test_chat_example_rooms_quit_and_clock(spawn):
    child = spawn([str(ROOT / "examples" / "chat" / "chat.py"), "--port", "0", "--tick", "0.05"])
    address = child.wait_listening()
    a, b = connect_retry(address), connect_retry(address)
    wa = messages_except_ticks(a, 1)[0]
    wb = messages_except_ticks(b, 1)[0]
    assert wa.startswith(b"welcome ") and wb.startswith(b"welcome ")
    ida, idb = int(wa.split()[1].rstrip(b",")), int(wb.split()[1].rstrip(b","))
    a.send(b"hello\n")
    assert messages_except_ticks(a, 1) == [b"%d: hello" % ida]
    assert messages_except_ticks(b, 1) == [b"%d: hello" % ida]
    b.send(b"/join attic\n")
    assert messages_except_ticks(b, 1) == [b"you are in attic"]
    a.send(b"anyone?\n")
    assert messages_except_ticks(a, 1) == [b"%d: anyone?" % ida]
    b.send(b"up here\n")
    assert messages_except_ticks(b, 1) == [b"%d: up here" % idb]
    # The clock reaches everyone, whatever the room.
    for c in (a, b):
        while not c.recv_message().startswith(b"tick "):
            pass
    b.send(b"/quit\n")
    rest = wait_closed(b)
    assert b"bye\n" in rest and rest.endswith(b"\n")
    child.signal(signal.SIGINT)
    assert child.wait(20) == 0, child.stderr()
    a.close()
    b.close()


@pytest.fixture(scope="module")
def pubsub_lib(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("pubsub"), ROOT / "examples" / "native_c" / "pubsub.c",
                 "pubsub")


def test_native_pubsub_example_publishes_and_ticks_from_its_thread(make_server, connect,
                                                                   pubsub_lib, backend):
    srv = make_server(pollpool.NativeHandler.from_library(str(pubsub_lib), "pubsub"))
    s1, s2, pub = connect(srv), connect(srv), connect(srv)
    assert s1.exchange([b"SUB news"]) == [b"subscribed news"]
    assert s2.exchange([b"SUB news"]) == [b"subscribed news"]
    assert s2.exchange([b"SUB other"]) == [b"subscribed other"]
    assert pub.exchange([b"PUB news hello world"]) == [b"2"]
    assert s1.recv_message() == b"message news hello world"
    assert s2.recv_message() == b"message news hello world"
    assert s2.exchange([b"UNSUB news"]) == [b"unsubscribed news"]
    assert pub.exchange([b"PUB news again"]) == [b"1"]
    assert s1.recv_message() == b"message news again"
    assert pub.exchange([b"PUB nobody x"]) == [b"0"]
    assert pub.exchange([b"TICK 300"]) == [b"ok"]
    ticks = [b"tick %d" % k for k in range(300)]
    assert pub.recv_messages(301) == ticks + [b"ticked"]
    assert s1.recv_messages(300) == ticks
    assert s2.recv_messages(300) == ticks
    st = srv.stats()
    assert st["pushes"] == 2 + 1 + 900 + 1 and st["handler_errors"] == 0, st


ABI1 = r"""
#include <stddef.h>
#include <stdint.h>
/* What a handler built against the version-1 pollpool.h saw: three fields. */
typedef struct pp_reply {
    int (*write)(struct pp_reply *reply, const void *data, size_t len);
    uint64_t conn_id;
    void *impl;
} pp_reply;
__attribute__((visibility("default"))) const int pollpool_abi_version = 1;

__attribute__((visibility("default")))
int old(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    (void)ctx;
    if (reply->write(reply, "v1:", 3) < 0)
        return -1;
    return reply->write(reply, msg, len) < 0 ? -1 : 0;
}
"""


def test_a_library_built_for_abi_1_loads_and_works(tmp_path, make_server, connect, backend):
    lib = build(tmp_path, ABI1, "old")
    srv = make_server(pollpool.NativeHandler.from_library(str(lib), "old"))
    c = connect(srv, LINE)
    assert c.exchange([b"a", b"bc"]) == [b"v1:a", b"v1:bc"]
