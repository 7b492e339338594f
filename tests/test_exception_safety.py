"""Every state change of a Server survives what can interrupt it.

A stop() called by one of the server's own handlers (it cannot wait for
itself), an on_ready that raises, a Ctrl+C at a random moment of start() or
serve_forever(), an interpreter exit with a server on a non-daemon thread:
each must leave the server stopped or stoppable, the port closed after the
stop, the signal handlers restored, and the process able to exit.

Scripts run in child processes: Ctrl+C and interpreter exit are theirs to
have, and a hang there is a failed wait here, never a hung test run.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import Framer, connect_retry, subprocess_env, wait_closed

pytestmark = pytest.mark.timeout(180)


def write(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run_script(tmp_path, body: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    path = write(tmp_path, "script.py", body)
    try:
        return subprocess.run([sys.executable, str(path), *args], cwd=tmp_path,
                              env=subprocess_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"script hung; stdout: {e.stdout!r}; stderr: {e.stderr!r}") from None


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---- stop() from a handler -------------------------------------------------

STOP_FROM_HANDLER = """
    import json, sys, pollpool

    kind = sys.argv[1]
    srv = None

    class Protocol:
        def on_message(self, conn, message):
            if message == b"shutdown":
                srv.stop()          # must return at once
                return b"stopping"
            return message.upper()

    class OnDisconnect:
        def on_message(self, conn, message):
            return message.upper()
        def on_disconnect(self, conn):
            srv.stop()

    def plain(message):
        if message == b"shutdown":
            srv.stop()
            return b"stopping"
        return message.upper()

    handler = {"aware": Protocol(), "plain": plain, "disconnect": OnDisconnect()}[kind]
    srv = pollpool.Server(handler, port=0, threads=2, drain_timeout=20,
                          shutdown_message=b"goodbye")
    stats = srv.serve_forever(on_ready=lambda: print("pollpool listening on %s:%d" % srv.address,
                                                     flush=True))
    print(json.dumps({"forced": srv.forced, **stats}), flush=True)
    sys.exit(130 if srv.forced else 0)
"""


@pytest.mark.parametrize("kind", ["aware", "plain"])
def test_stop_from_a_handler_delivers_its_replies_then_goodbye_then_eof(spawn, tmp_path, kind):
    script = write(tmp_path, "stop_from_handler.py", STOP_FROM_HANDLER)
    child = spawn([str(script), kind])
    address = child.wait_listening()
    c = connect_retry(address)
    c.send(b"one\ntwo\nshutdown\n")
    # Every reply of the task the stop came from, the shutdown message, EOF:
    # a stop that waited for its own task would hold all of it until the
    # drain timeout forced the connection closed.
    assert wait_closed(c, 15) == b"ONE\nTWO\nstopping\ngoodbye\n"
    c.close()
    assert child.wait(15) == 0, child.stderr()
    stats = json.loads(child.lines[-1])
    assert stats["forced"] is False and stats["forced_closes"] == 0, stats
    assert stats["handler_errors"] == 0, stats


def test_stop_from_on_disconnect_ends_the_server_without_forcing(spawn, tmp_path):
    script = write(tmp_path, "stop_from_handler.py", STOP_FROM_HANDLER)
    child = spawn([str(script), "disconnect"])
    address = child.wait_listening()
    c = connect_retry(address)
    assert c.exchange([b"hi"]) == [b"HI"]
    c.close()
    assert child.wait(15) == 0, child.stderr()
    assert json.loads(child.lines[-1])["forced"] is False


def test_stop_from_a_handler_of_a_background_server_returns_at_once(make_server, connect):
    import threading
    returned = threading.Event()
    box = {}

    def handler(message):
        box["srv"].stop()
        returned.set()
        return b"ok"

    srv = box["srv"] = make_server(handler, drain_timeout=20)
    c = connect(srv)
    c.send(b"x\n")
    assert returned.wait(10), "stop() from the handler did not return"
    assert c.recv_message() == b"ok"
    assert wait_closed(c) == b""
    srv.stop(timeout=20)
    assert not srv.forced


# ---- on_ready raising ------------------------------------------------------

ON_READY_RAISES = """
    import json, signal, socket, sys, pollpool

    processes = int(sys.argv[1])
    srv = pollpool.Server(pollpool.handlers.echo, port=0, processes=processes)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_ready():
        raise BrokenPipeError(32, "stdout is gone")

    try:
        srv.serve_forever(on_ready=on_ready)
    except BrokenPipeError:
        pass
    else:
        sys.exit("on_ready's exception did not propagate")
    port = srv.address[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        refused = False
    except ConnectionRefusedError:
        refused = True
    try:
        srv.serve_forever()
        again = "served"
    except RuntimeError:
        again = "refused"
    after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    print(json.dumps({"refused": refused, "running": srv.running, "again": again,
                      "signals_restored": before == after}), flush=True)
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_on_ready_raising_stops_the_server_and_restores_signals(tmp_path, processes):
    res = run_script(tmp_path, ON_READY_RAISES, str(processes), timeout=60)
    assert res.returncode == 0, res.stderr
    got = last_json(res.stdout)
    assert got == {"refused": True, "running": False, "again": "refused",
                   "signals_restored": True}, (got, res.stderr)


def test_cli_with_its_stdout_closed_exits_instead_of_hanging(tmp_path):
    # python -m pollpool --port 0 | true: printing the address fails.
    proc = subprocess.Popen([sys.executable, "-m", "pollpool", "--port", "0"], cwd=tmp_path,
                            env=subprocess_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the CLI hung with its stdout closed") from None
    assert proc.returncode not in (0, 130), proc.returncode
    assert b"Traceback" not in err, err.decode()


# ---- Ctrl+C at a random moment ------------------------------------------------

INTERRUPTED_STARTS = """
    import json, os, random, signal, socket, sys, threading, time, faulthandler, pollpool

    # A hang anywhere below is the bug: dump and die rather than wait.
    faulthandler.dump_traceback_later(100, exit=True)
    mode, n, max_delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    processes = 2 if mode == "processes" else 1
    rng = random.Random(1234)
    interrupted = 0
    base_threads = threading.active_count()
    base_fds = len(os.listdir("/proc/self/fd"))

    def live_children():
        out = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(os.getpid()) and fields[0] != "Z":
                out.append(int(p))
        return out
    for i in range(n):
        srv = pollpool.Server(pollpool.handlers.echo, port=0, threads=2, processes=processes,
                              drain_timeout=5)
        timer = threading.Timer(rng.uniform(0, max_delay), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            if mode == "serve":
                # Stopped from another thread once serving (a stop before
                # would make serve_forever refuse a stopped server).
                stopper = threading.Timer(max_delay * 2, srv.stop)
                stopper.daemon = True
                srv.serve_forever(on_ready=stopper.start)
            else:
                srv.start()
            time.sleep(max_delay * 1.5)  # the signal lands here if not before
        except KeyboardInterrupt:
            interrupted += 1
            # Whatever state it says it is in must be true: a server that
            # says stopped has no process left serving its port.
            if not srv.running and processes > 1:
                time.sleep(0.3)
                assert not live_children(), (i, srv, live_children())
        finally:
            timer.cancel()
            timer.join()
        try:
            srv.stop(timeout=5)
        except KeyboardInterrupt:  # a late signal; stop once more
            srv.stop(timeout=5)
        assert not srv.running, (i, srv)
        assert repr(srv).endswith("stopped>") or repr(srv).endswith("new>"), (i, srv)
    # Every listener is closed (counted as this process's fds: a port
    # that answers could be another process's that reused the number), no
    # server thread or child process is left.
    time.sleep(0.2)
    leaked_fds = len(os.listdir("/proc/self/fd")) - base_fds
    children = live_children()
    print(json.dumps({"interrupted": interrupted, "n": n, "leaked_fds": leaked_fds,
                      "threads": threading.active_count() - base_threads,
                      "children": len(children)}), flush=True)
"""


@pytest.mark.parametrize("mode,n,max_delay", [
    ("start", 600, 0.0015),
    ("serve", 300, 0.0015),
    ("processes", 12, 0.08),
], ids=["start", "serve_forever", "processes2"])
def test_ctrl_c_at_a_random_moment_of_starting_leaves_the_server_stoppable(
        tmp_path, mode, n, max_delay):
    res = run_script(tmp_path, INTERRUPTED_STARTS, mode, str(n), str(max_delay), timeout=150)
    assert res.returncode == 0, res.stderr[-4000:]
    got = last_json(res.stdout)
    assert got["leaked_fds"] <= 0 and got["threads"] == 0 and got["children"] == 0, got
    # The sweep must really interrupt starts, or it proves nothing.
    assert got["interrupted"] > 0, got


# ---- interpreter exit ------------------------------------------------------

NON_DAEMON = """
    import threading, pollpool

    srv = pollpool.Server(pollpool.handlers.echo, port=0, shutdown_message=b"bye")
    srv.listen()

    def serve():
        stats = srv.serve_forever()
        print("served", stats["accepted"], flush=True)

    threading.Thread(target=serve).start()   # not a daemon
    import socket, time
    c = socket.create_connection(srv.address)
    c.sendall(b"hello\\n")
    assert c.recv(6) == b"hello\\n"
    print("connected", flush=True)
    # The main thread ends here with the server still serving: interpreter
    # exit must stop it (and so end the non-daemon thread) first.
    _client = c
"""


def test_interpreter_exit_stops_a_server_running_on_a_non_daemon_thread(tmp_path):
    res = run_script(tmp_path, NON_DAEMON, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["connected", "served 1"], res.stdout


STOP_FROM_CHILD_HANDLER = """
    import json, sys, pollpool
    srv = None

    def handler(message):
        if message == b"shutdown":
            srv.stop()              # in a server process: asks the parent
            return b"stopping"
        if message == b"accepted":
            return b"%d" % srv.stats()["accepted"]   # this process's counters
        n = srv.broadcast(b"hello all")   # this process's connections
        return b"%d" % n

    srv = pollpool.Server(handler, port=0, processes=2, drain_timeout=20,
                          shutdown_message=b"goodbye")
    stats = srv.serve_forever(on_ready=lambda: print("pollpool listening on %s:%d" % srv.address,
                                                     flush=True))
    print(json.dumps({"forced": srv.forced, **stats}), flush=True)
"""


def test_stop_and_pushes_from_a_handler_of_a_server_process(spawn, tmp_path):
    script = write(tmp_path, "stop_from_child.py", STOP_FROM_CHILD_HANDLER)
    child = spawn([str(script)])
    address = child.wait_listening()
    c = connect_retry(address)
    c.send(b"x\n")
    # The task's reply, then the push its handler made (pushes made in a
    # handler go after the task's replies).
    assert c.recv_message() == b"1"
    assert c.recv_message() == b"hello all"
    assert c.exchange([b"accepted"]) == [b"1"]
    c.send(b"shutdown\n")
    assert wait_closed(c, 20) == b"stopping\ngoodbye\n"
    c.close()
    assert child.wait(30) == 0, child.stderr()
    stats = json.loads(child.lines[-1])
    assert stats["forced"] is False and stats["restarts"] == 0, stats
