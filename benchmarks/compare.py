#!/usr/bin/env python3
"""Side-by-side benchmark of pollpool against the peer servers.

Starts each server as a subprocess (a fresh one per measurement), drives it
with the C load generator (benchmarks/loadgen.c), and for every scenario and
placement alternates the servers within each repeat, so that drift of the
machine hits every server alike.  Records requests/s, latency percentiles,
errors, client CPU per request (the load generator's getrusage) and server CPU
per request (utime+stime of the whole server process from /proc/PID/stat,
sampled by the load generator at the edges of the measured window).

Writes benchmarks/results/<name>.json (every run), <name>.md (tables with the
median and the min-max spread, ratios against the C epoll reference and
uvloop, the targets of issue 3 marked met or not) and <name>.png (if
matplotlib is installed).

    python benchmarks/compare.py                 # everything (about 25 min)
    python benchmarks/compare.py --quick         # 2 scenarios, 2 s x 3 repeats
    python benchmarks/compare.py --list          # scenarios and servers
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "build")
PEERS = os.path.join(HERE, "peers")
RESULTS = os.path.join(HERE, "results")
PY = sys.executable
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


# ------------------------------------------------------------------ servers

def _server_cmd(server: str, handler: str, threads: int) -> List[str]:
    """The command line that starts `server` doing `handler` per message."""
    if server == "epoll_c":
        assert handler == "echo", "the C reference only echoes"
        return [os.path.join(BUILD, "epoll_echo"), "0"]
    if server == "pollpool_native":
        assert handler == "echo", "the native handler only echoes"
        return [PY, os.path.join(PEERS, "pollpool_server.py"), "--handler", "native",
                "--threads", str(threads)]
    if server == "pollpool_python":
        h = "python" if handler == "echo" else handler
        return [PY, os.path.join(PEERS, "pollpool_server.py"), "--handler", h,
                "--threads", str(threads)]
    if server in ("pollpool_async", "pollpool_async_epoll"):
        h = "async" if handler == "echo" else "async_" + handler
        cmd = [PY, os.path.join(PEERS, "pollpool_server.py"), "--handler", h,
               "--threads", str(threads)]
        return cmd + (["--backend", "epoll"] if server.endswith("_epoll") else [])
    if server in ("pollpool_native_deferred", "pollpool_native_deferred16"):
        assert handler == "echo", "the deferred native handler only echoes"
        cmd = [PY, os.path.join(PEERS, "pollpool_server.py"), "--handler", "native",
               "--threads", str(threads), "--native-lib",
               os.path.join(BUILD, "deferred_echo.so") + ":deferred_echo"]
        return cmd + (["--max-deferred", "16"] if server.endswith("16") else [])
    if server == "uvloop_tasks":
        return [PY, os.path.join(PEERS, "asyncio_server.py"), "--handler", handler,
                "--uvloop", "--tasks"]
    if server.startswith("pollpool_native_"):
        # pollpool_native_epoll, pollpool_native_procs2.
        variant = server[len("pollpool_native_"):]
        cmd = [PY, os.path.join(PEERS, "pollpool_server.py"), "--handler", "native",
               "--threads", str(threads)]
        if variant == "procs2":
            return cmd + ["--processes", "2"]
        return cmd + ["--backend", variant]
    if server in ("asyncio", "uvloop", "uvloop_executor"):
        cmd = [PY, os.path.join(PEERS, "asyncio_server.py"), "--handler", handler]
        if server != "asyncio":
            cmd.append("--uvloop")
        if server == "uvloop_executor":
            cmd += ["--executor", str(threads)]
        return cmd
    if server in ("socketserver", "gevent"):
        return [PY, os.path.join(PEERS, f"{server}_server.py"), "--handler", handler]
    raise KeyError(server)


SERVER_LABELS = {
    "epoll_c": "C epoll (1 thread)",
    "pollpool_native": "pollpool native echo (poll)",
    "pollpool_python": "pollpool Python handler",
    "pollpool_native_epoll": "pollpool native echo, epoll",
    "pollpool_native_procs2": "pollpool native echo, processes=2",
    "pollpool_native_deferred": "pollpool native echo, deferred to a thread",
    "pollpool_native_deferred16": "pollpool native echo, deferred to a thread, max_deferred=16",
    "pollpool_async": "pollpool async def handler",
    "pollpool_async_epoll": "pollpool async def handler, epoll",
    "uvloop_tasks": "uvloop Protocol + create_task per message",
    "asyncio": "asyncio Protocol",
    "uvloop": "uvloop Protocol (inline)",
    "uvloop_executor": "uvloop + run_in_executor",
    "socketserver": "socketserver.ThreadingTCPServer",
    "gevent": "gevent StreamServer",
}
SERVER_NEEDS = {"uvloop": "uvloop", "uvloop_executor": "uvloop", "gevent": "gevent",
                "uvloop_tasks": "uvloop"}
ECHO_SERVERS = ["epoll_c", "pollpool_native", "pollpool_native_epoll", "pollpool_python",
                "asyncio", "uvloop", "socketserver", "gevent"]


# ---------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    name: str
    title: str
    conns: int
    depth: int
    size: int
    handler: str = "echo"
    expect: str = "echo"
    threads: int = 2                  # pollpool workers / executor threads
    servers: List[str] = field(default_factory=lambda: list(ECHO_SERVERS))
    placements: List[str] = field(default_factory=lambda: ["pinned", "unpinned"])
    uvloop_ref: str = "uvloop"        # the row the "x uvloop" columns divide by
    ideal_rps: Optional[float] = None
    idle: int = 0                     # idle connections held open during the run


#: Throughput against idle connections (issue 6): 50 active connections,
#: pipeline 1, 64 B, with this many more connections open and silent.
IDLE_SWEEP = [0, 1000, 5000, 10000]
IDLE_SERVERS = ["epoll_c", "pollpool_native", "pollpool_native_epoll"]


def _idle_name(n: int) -> str:
    return "c50_p1_64" if n == 0 else f"c50_p1_64_idle{n // 1000}k"


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("c1_p1_64", "1 connection, pipeline 1, 64 B (latency)", 1, 1, 64),
    Scenario("c50_p1_64", "50 connections, pipeline 1, 64 B", 50, 1, 64),
    Scenario("c50_p16_64", "50 connections, pipeline 16, 64 B", 50, 16, 64),
    Scenario("c50_p1_4k", "50 connections, pipeline 1, 4 KiB", 50, 1, 4096),
    Scenario("c10_p1_1k", "10 connections, pipeline 1, 1 KiB (uvloop's published setup)",
             10, 1, 1024),
    Scenario("c1000_p1_64", "1,000 connections, pipeline 1, 64 B", 1000, 1, 64),
    Scenario("blocking_1ms", "Blocking handler (time.sleep 1 ms), 100 connections, 32 threads",
             100, 1, 64, handler="sleep1ms", threads=32,
             servers=["pollpool_python", "uvloop_executor", "socketserver", "uvloop", "gevent"],
             placements=["pinned"], uvloop_ref="uvloop_executor", ideal_rps=32000.0),
    # socketserver runs a thread per connection: the same handler with as
    # many pool threads, so that the comparison is at equal concurrency.
    Scenario("blocking_1ms_t100", "Blocking handler (time.sleep 1 ms), 100 connections, "
             "100 threads", 100, 1, 64, handler="sleep1ms", threads=100,
             servers=["pollpool_python", "uvloop_executor", "socketserver"],
             placements=["pinned"], uvloop_ref="uvloop_executor", ideal_rps=100000.0),
    Scenario("sha256_16k", "GIL-releasing handler (sha256 of 16 KiB, hex reply), "
             "50 connections, 2 threads", 50, 1, 16384, handler="sha256", expect="sha256",
             threads=2, servers=["pollpool_python", "uvloop", "uvloop_executor", "socketserver"],
             placements=["unpinned"], uvloop_ref="uvloop"),
    # Issue 15: coroutine handlers and deferred replies.
    Scenario("async_c50_p1_64", "async def identity handler, 50 connections, pipeline 1, 64 B",
             50, 1, 64, servers=["pollpool_async", "uvloop"], placements=["pinned"]),
    Scenario("async_c50_p16_64", "async def identity handler, 50 connections, pipeline 16, "
             "64 B", 50, 16, 64, servers=["pollpool_async", "uvloop"], placements=["pinned"]),
    Scenario("async_sleep_c1000", "async def handler awaiting asyncio.sleep(0.001), 1,000 "
             "connections, pipeline 1", 1000, 1, 64, handler="sleep1ms",
             servers=["pollpool_async_epoll", "pollpool_async", "uvloop_tasks"],
             placements=["pinned"], uvloop_ref="uvloop_tasks"),
    Scenario("deferred_c50_p16_64", "native echo deferred to another thread, 50 connections, "
             "pipeline 16, 64 B", 50, 16, 64,
             servers=["pollpool_native", "pollpool_native_deferred",
                      "pollpool_native_deferred16"], placements=["pinned"]),
] + [
    Scenario(_idle_name(n), f"50 connections, pipeline 1, 64 B, {n:,} idle connections open",
             50, 1, 64, idle=n, servers=list(IDLE_SERVERS), placements=["pinned"])
    for n in IDLE_SWEEP if n
] + [
    Scenario(f"procs_c50_p{d}_64", f"processes=2 against 1: 50 connections, pipeline {d}, "
             "64 B, client and server sharing both cores", 50, d, 64,
             servers=["epoll_c", "pollpool_native", "pollpool_native_procs2"],
             placements=["unpinned"])
    for d in (1, 16)
]}
QUICK = ["c50_p1_64", "c50_p16_64"]


# -------------------------------------------------------------------- build

def build() -> None:
    os.makedirs(BUILD, exist_ok=True)
    for src, out in ((os.path.join(HERE, "loadgen.c"), "loadgen"),
                     (os.path.join(PEERS, "epoll_echo.c"), "epoll_echo")):
        dst = os.path.join(BUILD, out)
        if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            continue
        cmd = [os.environ.get("CC", "cc"), *CFLAGS, "-o", dst, src]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, timeout=120)
    src = os.path.join(PEERS, "deferred_echo.c")
    dst = os.path.join(BUILD, "deferred_echo.so")
    if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
        import pollpool
        cmd = [os.environ.get("CC", "cc"), *CFLAGS, "-shared", "-fPIC",
               "-I" + pollpool.get_include(), "-o", dst, src, "-lpthread"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, timeout=120)


# ------------------------------------------------------------------ running

class ServerProcess:
    """A server subprocess; `with` guarantees it is gone afterwards."""

    def __init__(self, cmd: List[str], cpu: Optional[int], log_path: str) -> None:
        self.cmd = cmd
        self.log = open(log_path, "ab")
        self.log.write(f"\n==== {_dt.datetime.now().isoformat()} {shlex.join(cmd)}\n".encode())
        self.log.flush()
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.DEVNULL, preexec_fn=preexec)
        try:
            self.port = self._wait_listening(timeout=20.0)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if "listening on" in line:
                        return int(line.rsplit(":", 1)[1])
            elif self.proc.poll() is not None:
                break
        raise RuntimeError(f"server did not start: {shlex.join(self.cmd)}: "
                           f"exit={self.proc.poll()} stdout={buf[-300:]!r}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _machine_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, threshold: float = 0.15) -> dict:
    """Waits (at most max_wait s) until the machine's busy CPU over 0.5 s is
    below `threshold` cores: other work on a 2-core box skews every figure."""
    start = time.monotonic()
    while True:
        b0 = _machine_busy()
        time.sleep(0.5)
        cores = (_machine_busy() - b0) / 0.5
        waited = time.monotonic() - start
        if cores < threshold or waited >= max_wait:
            return {"pre_busy_cores": round(cores, 3), "waited_s": round(waited, 1)}


def _pollpool_so() -> Optional[str]:
    """Identifies the compiled pollpool in use (it is an editable install that
    may be rebuilt while a long run goes on)."""
    spec = importlib.util.find_spec("pollpool")
    if not spec or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    for n in sorted(os.listdir(d)):
        if n.startswith("_native") and n.endswith(".so"):
            st = os.stat(os.path.join(d, n))
            return f"{n} mtime={int(st.st_mtime)} size={st.st_size}"
    return None


def run_one(sc: Scenario, server: str, placement: str, args, log_path: str) -> dict:
    cmd = _server_cmd(server, sc.handler, sc.threads)
    pinned = placement == "pinned"
    rec = {"scenario": sc.name, "server": server, "placement": placement,
           "server_cmd": shlex.join(cmd)}
    if server.startswith("pollpool"):
        rec["pollpool_so"] = _pollpool_so()
    if args.wait_quiet > 0:
        rec.update(wait_quiet(args.wait_quiet))
    srv = None
    try:
        srv = ServerProcess(cmd, 0 if pinned else None, log_path)
        lg = [os.path.join(BUILD, "loadgen"), "--port", str(srv.port),
              "--conns", str(sc.conns), "--depth", str(sc.depth), "--size", str(sc.size),
              "--expect", sc.expect, "--duration", str(args.duration),
              "--warmup", str(args.warmup), "--grace", str(args.grace),
              "--server-pid", str(srv.proc.pid)]
        if pinned:
            lg += ["--cpu", "1"]
        if sc.idle:
            lg += ["--idle", str(sc.idle)]
        rec["loadgen_cmd"] = shlex.join(lg)
        limit = args.warmup + args.duration + args.grace + 10 + 20 + sc.idle / 200
        p = subprocess.run(lg, capture_output=True, text=True, timeout=limit)
        rec["loadgen_rc"] = p.returncode
        if p.stderr.strip():
            rec["loadgen_stderr"] = p.stderr.strip()[-2000:]
        try:
            rec.update(json.loads(p.stdout))
            if "machine_busy_s" in rec and rec.get("server_cpu_s", -1) >= 0:
                # CPU the machine spent beyond server + client: other processes,
                # or softirq time not charged to either task.
                rec["other_cores"] = round((rec["machine_busy_s"] - rec["server_cpu_s"]
                                            - rec["client_cpu_s"]) / rec["duration_s"], 3)
        except json.JSONDecodeError:
            rec["failure"] = f"loadgen printed no JSON (rc={p.returncode})"
        rec["server_alive_after"] = srv.alive()
        if not rec["server_alive_after"]:
            rec["failure"] = f"server exited during the run (rc={srv.proc.returncode})"
    except subprocess.TimeoutExpired:
        rec["failure"] = "loadgen timed out"
    except RuntimeError as e:
        rec["failure"] = str(e)
    finally:
        if srv is not None:
            rec["server_exit"] = srv.stop()
    return rec


# ----------------------------------------------------------------- summary

def _med(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: List[dict]) -> Dict[str, dict]:
    """(scenario|placement|server) -> medians, spreads and totals."""
    groups: Dict[str, List[dict]] = {}
    discarded: Dict[str, int] = {}
    for r in runs:
        if r.get("discarded"):
            k = f"{r['scenario']}|{r['placement']}|{r['server']}"
            discarded[k] = discarded.get(k, 0) + 1
            continue
        groups.setdefault(f"{r['scenario']}|{r['placement']}|{r['server']}", []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if "rps" in r]
        s = {"runs": len(rs), "discarded": discarded.get(key, 0), "failures": [r["failure"] for r in rs if "failure" in r],
             "errors": sum(r.get("errors", 0) for r in ok),
             "mismatches": sum(r.get("mismatches", 0) for r in ok),
             "lost": sum(r.get("lost", 0) for r in ok),
             "closed_early": sum(r.get("closed_early", 0) for r in ok)}
        for f in ("rps", "p50_us", "p99_us", "p999_us", "server_cpu_us_per_req",
                  "client_cpu_us_per_req"):
            vals = [r[f] for r in ok if r.get(f) is not None and r.get(f, -1) >= 0]
            s[f] = _med(vals)
            s[f + "_min"] = min(vals) if vals else None
            s[f + "_max"] = max(vals) if vals else None
        busy = [r["client_cpu_s"] / r["duration_s"] for r in ok if r.get("duration_s")]
        s["client_busy"] = _med(busy)      # fraction of one core the client used
        sbusy = [r["server_cpu_s"] / r["duration_s"] for r in ok
                 if r.get("duration_s") and r.get("server_cpu_s", -1) >= 0]
        s["server_cores"] = _med(sbusy)
        s["other_cores"] = _med([r["other_cores"] for r in ok if "other_cores" in r])
        s["other_cores_max"] = max([r["other_cores"] for r in ok if "other_cores" in r],
                                   default=None)
        s["pollpool_builds"] = sorted({r["pollpool_so"] for r in rs if r.get("pollpool_so")})
        idle = [r for r in ok if r.get("idle")]
        if idle:
            s["idle"] = idle[0]["idle"]
            s["idle_unanswered"] = sum(r["idle"] - r["idle_answered"] for r in idle)
            s["idle_setup_s"] = _med([r["idle_setup_s"] for r in idle])
            s["rss_bytes_per_idle_conn"] = _med([r["server_rss_bytes_per_idle_conn"]
                                                 for r in idle
                                                 if "server_rss_bytes_per_idle_conn" in r])
        out[key] = s
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _f(x: Optional[float], nd: int = 1) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def _spread(s: dict, f: str, nd: int = 1) -> str:
    if s.get(f) is None:
        return "–"
    return f"{_f(s[f], nd)} ({_f(s[f + '_min'], nd)}–{_f(s[f + '_max'], nd)})"


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    try:
        from importlib import metadata
        for pkg in ("pollpool", "cffi", "uvloop", "gevent", "matplotlib"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
    except ImportError:
        pass
    try:
        cc = subprocess.run([os.environ.get("CC", "cc"), "--version"], capture_output=True,
                            text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        cc = "unknown"
    try:
        rev = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "versions": versions, "cc": cc,
            "git": rev, "hostname_hidden": True}


def _get(summary, sc, pl, srv):
    return summary.get(f"{sc}|{pl}|{srv}")


def paired_ratios(runs: List[dict], sc: str, pl: str, srv: str, ref: str, field: str,
                  ref_sc: Optional[str] = None) -> List[float]:
    """srv's value / ref's value within each repeat, one ratio per repeat.

    The servers of one repeat run back to back, so the machine's speed,
    which on a shared machine drifts between levels some 20% apart over tens
    of seconds, is nearly the same for both; the ratio of two medians taken
    over the whole run mixes speed levels instead.
    """
    def by_repeat(scn: str, server: str) -> Dict[int, float]:
        return {r["repeat"]: r[field] for r in runs
                if r["scenario"] == scn and r["placement"] == pl and r["server"] == server
                and not r.get("discarded") and r.get(field) is not None
                and r[field] >= 0 and "repeat" in r}
    a, b = by_repeat(sc, srv), by_repeat(ref_sc or sc, ref)
    return [a[k] / b[k] for k in sorted(a) if k in b and b[k]]


def median_ci(xs: List[float], level: float = 0.9) -> Optional[tuple]:
    """A confidence interval for the median of the distribution xs came
    from, assuming only independent repeats: the order statistics
    (x_(k), x_(n+1-k)) with the largest k whose coverage, from the binomial
    distribution of how many values fall below the median, is at least
    `level`.  Returns None for fewer than the repeats any k needs (5 at 90%).
    """
    xs = sorted(xs)
    n = len(xs)
    best = None
    below = 0.0  # P(Binomial(n, 1/2) < k)
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1) / 2.0 ** n
        if 1.0 - 2.0 * below < level:
            break
        best = (xs[k - 1], xs[n - k])
    return best


def judge(ci: Optional[tuple], median: float, op: str, bound: float) -> str:
    """met / NOT met when the whole confidence interval is on one side of the
    bound, "within noise" when it straddles it (or there are too few repeats
    to tell)."""
    def ok(x: float) -> bool:
        return x >= bound if op == ">=" else x <= bound
    if ci is None:
        return ("met" if ok(median) else "NOT met") + " (too few repeats to tell from noise)"
    lo, hi = ci
    if ok(lo) and ok(hi):
        return "met"
    if not ok(lo) and not ok(hi):
        return "NOT met"
    return "within noise"


def ci_text(ci: Optional[tuple], nd: int = 3, sep: str = "–") -> str:
    """The interval rounded outwards to nd places, as intervals are: an end
    just short of a target (0.94992 against 0.95) must not print as the
    target itself beside "within noise"."""
    if not ci:
        return "–"
    scale = 10 ** nd
    lo = math.floor(ci[0] * scale + 1e-9) / scale
    hi = math.ceil(ci[1] * scale - 1e-9) / scale
    return f"{lo:.{nd}f}{sep}{hi:.{nd}f}"


def targets(summary: Dict[str, dict], runs: List[dict]) -> List[dict]:
    """The targets of issues 3 and 6, each with its measured ratio and status.
    The ratio is the median of per-repeat ratios (paired_ratios); the status
    follows its 90% confidence interval (judge); the ratio of the medians is
    kept beside it."""
    t = []

    def add(what, sc, pl, srv, ref, field, op, bound, note="", ref_sc=None):
        a, b = _get(summary, sc, pl, srv), _get(summary, ref_sc or sc, pl, ref)
        if not a or not b or a.get(field) is None or b.get(field) is None:
            t.append({"target": what, "ratio": None, "ratio_of_medians": None,
                      "status": "not measured", "note": note})
            return
        rm = a[field] / b[field]
        rs = paired_ratios(runs, sc, pl, srv, ref, field, ref_sc)
        r = _med(rs)
        ci = median_ci(rs)
        if r is None:
            r = rm
        status = "reported" if op is None else judge(ci, r, op, bound)
        t.append({"target": what, "ratio": r, "ratio_ci90": list(ci) if ci else None,
                  "ratios": rs, "ratio_of_medians": rm, "status": status, "note": note})

    for sc, lo, hi in (("c50_p1_64", 0.95, 1.15), ("c50_p16_64", 0.9, 1.25)):
        d = "pipeline 1" if "p1_" in sc else "pipeline 16"
        add(f"native echo, {d}: req/s ≥ {lo}× C epoll", sc, "pinned", "pollpool_native",
            "epoll_c", "rps", ">=", lo)
        add(f"native echo, {d}: server CPU/req ≤ {hi}× C epoll", sc, "pinned",
            "pollpool_native", "epoll_c", "server_cpu_us_per_req", "<=", hi)
    for sc in ("c50_p1_64", "c50_p16_64"):
        d = "pipeline 1" if "p1_" in sc else "pipeline 16"
        add(f"Python handler, {d}: req/s ≥ 1.0× uvloop", sc, "pinned", "pollpool_python",
            "uvloop", "rps", ">=", 1.0)
        add(f"Python handler, {d}: server CPU/req ≤ 1.0× uvloop", sc, "pinned",
            "pollpool_python", "uvloop", "server_cpu_us_per_req", "<=", 1.0)
    add("blocking 1 ms, threads=32: req/s ≥ 2× uvloop run_in_executor(32)", "blocking_1ms",
        "pinned", "pollpool_python", "uvloop_executor", "rps", ">=", 2.0,
        "ideal 32,000/s")
    add("blocking 1 ms, threads=32: req/s ≥ 1.5× socketserver", "blocking_1ms", "pinned",
        "pollpool_python", "socketserver", "rps", ">=", 1.5)
    add("blocking 1 ms, threads=100 (socketserver's thread count): req/s against "
        "socketserver", "blocking_1ms_t100", "pinned", "pollpool_python", "socketserver",
        "rps", None, None, "ideal 100,000/s")
    add("blocking 1 ms, threads=100: req/s against uvloop run_in_executor(100)",
        "blocking_1ms_t100", "pinned", "pollpool_python", "uvloop_executor", "rps", None,
        None)
    add("sha256 16 KiB, threads=2, unpinned: req/s ≥ 1.3× uvloop inline", "sha256_16k",
        "unpinned", "pollpool_python", "uvloop", "rps", ">=", 1.3)
    # Issue 15.
    for sc in ("async_c50_p1_64", "async_c50_p16_64"):
        d = "pipeline 1" if "p1_" in sc else "pipeline 16"
        add(f"async def identity, {d}: req/s ≥ 1.0× uvloop (inline, per message)", sc,
            "pinned", "pollpool_async", "uvloop", "rps", ">=", 1.0)
        add(f"async def identity, {d}: server CPU/req ≤ 1.0× uvloop", sc, "pinned",
            "pollpool_async", "uvloop", "server_cpu_us_per_req", "<=", 1.0)
    add("async def awaiting sleep(1 ms), 1,000 connections, epoll: req/s ≥ 1.3× uvloop + "
        "create_task", "async_sleep_c1000", "pinned", "pollpool_async_epoll", "uvloop_tasks",
        "rps", ">=", 1.3)
    add("async def awaiting sleep(1 ms), 1,000 connections, poll: req/s against uvloop + "
        "create_task", "async_sleep_c1000", "pinned", "pollpool_async", "uvloop_tasks",
        "rps", None, None)
    add("native echo deferred to a thread, pipeline 16, max_deferred=16: req/s ≥ 0.85× "
        "synchronous native echo", "deferred_c50_p16_64", "pinned",
        "pollpool_native_deferred16", "pollpool_native", "rps", ">=", 0.85)
    add("same, max_deferred=1 (later messages wait): req/s against synchronous native echo",
        "deferred_c50_p16_64", "pinned", "pollpool_native_deferred", "pollpool_native", "rps",
        None, None)
    for sc in ("c50_p1_64", "c50_p16_64"):
        for srv in ("pollpool_native", "pollpool_python"):
            d = "pipeline 1" if "p1_" in sc else "pipeline 16"
            add(f"{SERVER_LABELS[srv]}, 50 conns {d}: p99 ≤ uvloop's", sc, "pinned", srv,
                "uvloop", "p99_us", "<=", 1.0)
    # Issue 6.
    top = _idle_name(IDLE_SWEEP[-1])
    for srv in ("pollpool_native_epoll", "pollpool_native"):
        v = _get(summary, top, "pinned", srv)
        if v and "idle" in v:
            ok = v["idle_unanswered"] == 0 and not v["failures"]
            rss = v.get("rss_bytes_per_idle_conn")
            t.append({"target": f"{SERVER_LABELS[srv]}: {v['idle']:,} connections open, "
                                f"every one answered",
                      "ratio": None, "ratio_of_medians": None,
                      "status": "met" if ok else "NOT met",
                      "note": f"set up in {v['idle_setup_s']:.2f} s; server RSS "
                              f"{rss:,.0f} B per idle connection" if rss else ""})
    add(f"epoll: 50 active with {IDLE_SWEEP[-1]:,} idle, req/s ≥ 0.9× with none", top,
        "pinned", "pollpool_native_epoll", "pollpool_native_epoll", "rps", ">=", 0.9,
        ref_sc="c50_p1_64")
    add(f"poll: 50 active with {IDLE_SWEEP[-1]:,} idle, req/s against none", top,
        "pinned", "pollpool_native", "pollpool_native", "rps", None, None,
        ref_sc="c50_p1_64")
    for d in (1, 16):
        sc = f"procs_c50_p{d}_64"
        add(f"processes=2 against 1, pipeline {d}, unpinned: req/s", sc, "unpinned",
            "pollpool_native_procs2", "pollpool_native", "rps", None, None)
        add(f"processes=2 against 1, pipeline {d}, unpinned: server CPU/req", sc, "unpinned",
            "pollpool_native_procs2", "pollpool_native", "server_cpu_us_per_req", None, None)
    return t


def write_markdown(path: str, meta: dict, summary: Dict[str, dict], scenarios: List[Scenario],
                   servers: List[str], png: Optional[str], chart_note: str) -> None:
    m = meta["machine"]
    L = [f"# pollpool benchmark — {meta['date']}", "",
         f"Command: `{meta['command']}`", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
         f"{m['cc']}; git `{m['git']}`.", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".", "",
         f"Each cell: median of {meta['repeats']} runs of {meta['duration']} s "
         f"(after {meta['warmup']} s warm-up), min–max in brackets. Servers alternate within "
         "each repeat; each run starts a fresh server process. *pinned*: server on CPU 0, "
         "load generator on CPU 1; *unpinned*: the scheduler places both on the 2 cores.", "",
         "Columns: **req/s** replies completed in the window per second; **srv µs/req** "
         "server CPU (user+sys, all threads, /proc/PID/stat) per reply; **srv cores** server "
         "CPU seconds per wall second; **cli µs/req** load-generator CPU per reply "
         "(**cli busy** ≥ 0.9 means the client, not the server, was the limit); latency "
         "percentiles in µs; **err** mismatched + lost replies + early closes + connect "
         "failures over all runs; **other cores** busy CPU of the whole machine "
         "(/proc/stat) beyond server + client, per wall second — softirq work not charged to "
         "either process, or other processes (runs above 0.15 are discarded and repeated up to --retries times; ⚠: a kept run "
         "is still above, treat that row with care); **×C** and **×uv** the ratio of the medians to the C epoll "
         "reference and to the uvloop row of the same table (req/s: higher is better; "
         "CPU: lower is better).", ""]
    for sc in scenarios:
        for pl in sc.placements:
            rows = [(s, _get(summary, sc.name, pl, s)) for s in sc.servers if s in servers]
            rows = [(s, v) for s, v in rows if v]
            if not rows:
                continue
            c = _get(summary, sc.name, pl, "epoll_c")
            u = _get(summary, sc.name, pl, sc.uvloop_ref)
            L += [f"## {sc.title} — {pl}", ""]
            if sc.ideal_rps:
                L += [f"Ideal: {sc.ideal_rps:,.0f} req/s.", ""]
            uvname = "×uv" if sc.uvloop_ref == "uvloop" else f"×{sc.uvloop_ref}"
            L += [f"| server | req/s | srv µs/req | srv cores | cli µs/req | cli busy | other cores | p50 µs "
                  f"| p99 µs | p99.9 µs | err | req/s ×C | CPU ×C | req/s {uvname} "
                  f"| CPU {uvname} |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for s, v in rows:
                err = str(v["errors"]) + (f" ({len(v['failures'])} failed runs)"
                                          if v["failures"] else "")
                L.append("| " + " | ".join([
                    SERVER_LABELS[s],
                    _spread(v, "rps", 0),
                    _spread(v, "server_cpu_us_per_req", 2),
                    _f(v["server_cores"], 2),
                    _f(v["client_cpu_us_per_req"], 2),
                    _f(v["client_busy"], 2),
                    _f(v["other_cores"], 2) + (" ⚠" if (v["other_cores_max"] or 0) > 0.15 else ""),
                    _f(v["p50_us"], 0), _f(v["p99_us"], 0), _f(v["p999_us"], 0), err,
                    _f(_ratio(v["rps"], c and c["rps"]), 2),
                    _f(_ratio(v["server_cpu_us_per_req"], c and c["server_cpu_us_per_req"]), 2),
                    _f(_ratio(v["rps"], u and u["rps"]), 2),
                    _f(_ratio(v["server_cpu_us_per_req"], u and u["server_cpu_us_per_req"]), 2),
                ]) + " |")
            L.append("")
    L += ["## Targets (issues 3 and 6)", "",
          "**ratio**: the median over repeats of the two servers' ratio within one repeat, "
          "where they ran back to back; **90% CI**: a distribution-free confidence interval "
          "for that median (order statistics of the per-repeat ratios). The status follows "
          "the interval: *met* or *NOT met* when all of it is on one side of the target, "
          "*within noise* when it straddles the target. **of medians**: the ratio of the "
          "two medians in the tables above; it differs when the machine's speed drifted "
          "during the run.", "",
          "| target | ratio | 90% CI | of medians | status |", "|---|---:|---:|---:|---|"]
    for t in meta["targets"]:
        note = f" ({t['note']})" if t["note"] else ""
        L.append(f"| {t['target']}{note} | {_f(t['ratio'], 2)} | {ci_text(t.get('ratio_ci90'))} | "
                 f"{_f(t.get('ratio_of_medians'), 2)} | {t['status']} |")
    L.append("")
    nd = sum(v["discarded"] for v in summary.values())
    if nd:
        L += [f"{nd} disturbed runs were discarded and repeated (listed in the JSON with "
              "`discarded`).", ""]
    builds = sorted({b for v in summary.values() for b in v["pollpool_builds"]})
    if len(builds) > 1:
        L += ["**Warning:** the compiled pollpool changed during this run (editable "
              "install rebuilt): " + "; ".join(builds), ""]
    failures = [(k, f) for k, v in summary.items() for f in v["failures"]]
    if failures:
        L += ["## Failed runs", ""] + [f"- `{k}`: {f}" for k, f in failures] + [""]
    if png:
        L += [f"![chart]({os.path.basename(png)})", ""]
    else:
        L += [f"Chart: {chart_note}", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def write_idle_chart(path: str, summary: Dict[str, dict], servers: List[str]) -> str:
    """Throughput and server CPU per request against idle connections (issue 6).
    Returns '' on success, else why no chart was drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed; no chart drawn."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn = False
    for srv in IDLE_SERVERS:
        if srv not in servers:
            continue
        pts = [(n, _get(summary, _idle_name(n), "pinned", srv)) for n in IDLE_SWEEP]
        pts = [(n, v) for n, v in pts if v and v["rps"] is not None]
        if len(pts) < 2:
            continue
        xs = [n for n, _ in pts]
        ax1.errorbar(xs, [v["rps"] for _, v in pts],
                     yerr=[[v["rps"] - v["rps_min"] for _, v in pts],
                           [v["rps_max"] - v["rps"] for _, v in pts]],
                     marker="o", capsize=3, label=SERVER_LABELS[srv])
        ax2.plot(xs, [v["server_cpu_us_per_req"] for _, v in pts], marker="o",
                 label=SERVER_LABELS[srv])
        drawn = True
    if not drawn:
        plt.close(fig)
        return "no idle-connection runs to draw."
    ax1.set_title("50 active connections (pipeline 1, 64 B), pinned")
    ax1.set_xlabel("idle connections open")
    ax1.set_ylabel("requests/s (median, min–max)")
    ax1.set_ylim(bottom=0)
    ax2.set_title("server CPU per request")
    ax2.set_xlabel("idle connections open")
    ax2.set_ylabel("µs/request (median)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def write_chart(path: str, summary: Dict[str, dict], scenarios: List[Scenario],
                servers: List[str]) -> str:
    """Returns '' on success, else why no chart was drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install -e '.[bench]'); no chart drawn."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(sc, pl) for sc in scenarios for pl in sc.placements
              if any(_get(summary, sc.name, pl, s) for s in sc.servers)]
    if not groups:
        return "no data to draw."
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 2.9 * len(groups) + 0.6),
                             squeeze=False)
    for i, (sc, pl) in enumerate(groups):
        names, rps, lo, hi, cpu, clo, chi = [], [], [], [], [], [], []
        for s in sc.servers:
            v = _get(summary, sc.name, pl, s)
            if not v or v["rps"] is None or s not in servers:
                continue
            names.append(SERVER_LABELS[s].replace(" (", "\n("))
            rps.append(v["rps"])
            lo.append(v["rps"] - v["rps_min"])
            hi.append(v["rps_max"] - v["rps"])
            c = v["server_cpu_us_per_req"] or 0
            cpu.append(c)
            clo.append(c - (v["server_cpu_us_per_req_min"] or c))
            chi.append((v["server_cpu_us_per_req_max"] or c) - c)
        colors = ["#d62728" if n.startswith("pollpool") else
                  "#7f7f7f" if n.startswith("C epoll") else "#1f77b4" for n in names]
        ax = axes[i][0]
        ax.barh(names, rps, xerr=[lo, hi], color=colors)
        ax.set_title(f"{sc.title} — {pl}: requests/s", fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)
        if sc.ideal_rps:
            ax.axvline(sc.ideal_rps, color="k", ls="--", lw=0.8)
        ax = axes[i][1]
        ax.barh(names, cpu, xerr=[clo, chi], color=colors)
        ax.set_title("server CPU µs per request (lower is better)", fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return ""


# --------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help=f"scenarios {','.join(QUICK)}, 2 s x 3 repeats, 0.5 s warm-up")
    p.add_argument("--scenarios", help="comma-separated scenario names (see --list)")
    p.add_argument("--servers", help="comma-separated server names (default: all available)")
    p.add_argument("--placements", help="pinned,unpinned (default: each scenario's own)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run (default 1)")
    p.add_argument("--grace", type=float, default=3.0, help="drain grace after each run")
    p.add_argument("--repeats", type=int, help="repeats (default 3)")
    p.add_argument("--wait-quiet", type=float, default=10.0, metavar="SEC",
                   help="before each run wait up to SEC s for the machine to be idle "
                        "(default 10; 0 = don't)")
    p.add_argument("--max-other", type=float, default=0.15, metavar="CORES",
                   help="a run during which other work used more than CORES of CPU "
                        "(machine busy - server - client) is discarded and repeated")
    p.add_argument("--retries", type=int, default=3,
                   help="how often a disturbed run is repeated before it is kept anyway "
                        "(default 3)")
    p.add_argument("--name", help="results file name without extension (default: the date)")
    p.add_argument("--list", action="store_true", help="list scenarios and servers and exit")
    p.add_argument("--judge", metavar="JSON",
                   help="print the targets of a saved run (results/<name>.json) as judged "
                        "by this version of the harness, and exit")
    args = p.parse_args(argv)

    if args.judge:
        with open(args.judge) as f:
            saved = json.load(f)
        for t in targets(saved["summary"], saved["runs"]):
            print(f"{t['status']:>14}  {_f(t['ratio'], 3):>6}  "
                  f"CI {ci_text(t.get('ratio_ci90'), sep='-'):>11}  "
                  f"of medians {_f(t['ratio_of_medians'], 3):>6}  {t['target']}")
        return 0

    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:14} {s.title}; servers: {','.join(s.servers)}; "
                  f"placements: {','.join(s.placements)}")
        print("servers:", ", ".join(SERVER_LABELS))
        return 0
    if args.quick:
        args.duration = args.duration or 2.0
        args.warmup = 0.5 if args.warmup is None else args.warmup
        args.repeats = args.repeats or 3
        names = args.scenarios.split(",") if args.scenarios else QUICK
    else:
        args.duration = args.duration or 5.0
        args.warmup = 1.0 if args.warmup is None else args.warmup
        args.repeats = args.repeats or 3
        names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; see --list")
    scenarios = [SCENARIOS[n] for n in names]
    servers = args.servers.split(",") if args.servers else list(SERVER_LABELS)
    bad = [s for s in servers if s not in SERVER_LABELS]
    if bad:
        p.error(f"unknown server(s) {bad}; see --list")
    notes = []
    for s in list(servers):
        mod = SERVER_NEEDS.get(s)
        if mod and importlib.util.find_spec(mod) is None:
            servers.remove(s)
            notes.append(f"{s} skipped: {mod} is not installed (pip install -e '.[bench]')")
    for sc in scenarios:
        # The pollpool variants (backends, processes) join the echo scenarios
        # when named with --servers.
        if sc.servers == ECHO_SERVERS:
            sc.servers = sc.servers + [s for s in servers if s.startswith("pollpool_native_")
                                       and s not in sc.servers]
    if args.placements:
        for sc in scenarios:
            sc.placements = [x for x in args.placements.split(",") if x]
    if args.repeats < 1 or args.duration <= 0:
        p.error("--repeats must be >= 1 and --duration > 0")
    for n in notes:
        print("note:", n, flush=True)

    build()
    os.makedirs(RESULTS, exist_ok=True)
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    name = args.name or (date + ("-quick" if args.quick else ""))
    log_path = os.path.join(BUILD, f"{name}.servers.log")
    plan = [(sc, pl, s) for sc in scenarios for pl in sc.placements
            for s in sc.servers if s in servers]
    per_run = args.warmup + args.duration + 1.0
    print(f"{len(plan)} configurations x {args.repeats} repeats, about "
          f"{len(plan) * args.repeats * per_run / 60:.1f} min; server logs in {log_path}",
          flush=True)

    runs: List[dict] = []
    started = time.time()

    def measure(sc: Scenario, server: str, pl: str, rep: int) -> None:
        """One measurement; repeated while other work disturbs it (at most
        --retries times).  Every attempt is kept in the JSON."""
        for attempt in range(args.retries + 1):
            rec = run_one(sc, server, pl, args, log_path)
            rec["repeat"], rec["attempt"] = rep, attempt
            runs.append(rec)
            if ((rec.get("other_cores") or 0) > args.max_other and attempt < args.retries
                    and not rec.get("errors")):
                rec["discarded"] = (f"other work used {rec['other_cores']:.2f} cores "
                                    f"(> {args.max_other}); run repeated")
            status = rec.get("failure") or (
                f"{rec['rps']:>11,.0f} req/s  srv {rec.get('server_cpu_us_per_req', -1):6.2f}"
                f" µs/req  cli {rec['client_cpu_us_per_req']:5.2f} µs/req  p99 "
                f"{rec['p99_us']:8.0f} µs  err {rec['errors']}")
            if rec.get("discarded"):
                status += "  [discarded: disturbed]"
            print(f"[{rep + 1}/{args.repeats}] {sc.name:13} {pl:8} {server:16} {status}",
                  flush=True)
            if rec.get("errors") and "loadgen_stderr" in rec:
                print("    loadgen: " + rec["loadgen_stderr"][:600].replace("\n", "\n    "),
                      flush=True)
            if not rec.get("discarded"):
                return

    for rep in range(args.repeats):
        for sc in scenarios:
            for pl in sc.placements:
                order = [s for s in sc.servers if s in servers]
                k = rep % len(order) if order else 0
                for s in order[k:] + order[:k]:     # alternate who goes first
                    measure(sc, s, pl, rep)

    summary = summarize(runs)
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
            if argv is None else shlex.join(["python", "benchmarks/compare.py", *argv]),
            "machine": machine_info(), "duration": args.duration, "warmup": args.warmup,
            "repeats": args.repeats, "elapsed_s": round(time.time() - started, 1),
            "notes": notes, "scenarios": [vars(sc) for sc in scenarios]}
    meta["targets"] = targets(summary, runs)
    base = os.path.join(RESULTS, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    chart_note = write_chart(base + ".png", summary, scenarios, servers)
    write_markdown(base + ".md", meta, summary, scenarios, servers,
                   None if chart_note else base + ".png", chart_note)
    if any(sc.idle for sc in scenarios):
        idle_note = write_idle_chart(base + "-idle.png", summary, servers)
        with open(base + ".md", "a") as f:
            f.write(f"\n![throughput against idle connections]({name}-idle.png)\n"
                    if not idle_note else f"\nIdle chart: {idle_note}\n")
    print(f"wrote {base}.json, {base}.md" + ("" if chart_note else f", {base}.png"))
    if chart_note:
        print("chart:", chart_note)
    errors = sum(v["errors"] for v in summary.values())
    failed = sum(len(v["failures"]) for v in summary.values())
    if errors or failed:
        print(f"WARNING: {errors} request errors, {failed} failed runs — see the tables")
    return 1 if errors or failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
