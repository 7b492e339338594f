#!/usr/bin/env python3
"""Push benchmarks: pollpool against asyncio + uvloop, side by side.

Scenarios (issue 14):
  broadcast10k  one thread broadcasts 64 B messages to 10,000 connections
  threads4x100  4 threads push 64 B messages to 100 connections each
  chat1k        1,000 clients in 10 rooms, each sending; each message to its room

For every repeat the two servers run back to back (order alternating), each a
fresh process pinned to CPU 0 with the receiver (pushsink.c) on CPU 1.
Measured: deliveries/s at the receiver (first to last delivery), delivery
latency (p50, p99, from the timestamp in each message), and the server
process's CPU time (utime+stime, all threads) over the run, per delivery;
pollpool's wake-fd writes per push from its stats.  The ratio of a repeat is
pollpool's figure over uvloop's in that repeat; the table gives the median
ratio and its 90% interval (as benchmarks/compare.py does).

    python benchmarks/push.py --repeats 5 --name 2026-12-01-push
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "build")
RESULTS = os.path.join(HERE, "results")
PY = sys.executable
sys.path.insert(0, HERE)
from compare import median_ci  # noqa: E402  (the same interval as the main harness)

SCENARIOS = {
    # name: (mode, connections, count, expected deliveries, chat rate/s/conn, chat seconds)
    "broadcast10k": ("broadcast", 10000, 100, 10000 * 100, 0.0, 0.0),
    "threads4x100": ("threads", 100, 2500, 4 * 100 * 2500, 0.0, 0.0),
    "chat1k": ("chat", 1000, 0, 0, 2.0, 5.0),
}
#: The slow-subscriber check: pollpool against itself, 100 readers of 64 KiB
#: broadcasts at 50/s, without and with one subscriber that never reads.
SLOW = ("feed", 100, 250, 100 * 250, 0.0, 0.0)


def build() -> str:
    os.makedirs(BUILD, exist_ok=True)
    out = os.path.join(BUILD, "pushsink")
    src = os.path.join(HERE, "pushsink.c")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", out, src], check=True)
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(sink: str, scenario: str, impl: str, pin: bool, stalled: int = 0) -> dict:
    mode, nconn, count, expect, rate, secs = SCENARIOS[scenario] if scenario in SCENARIOS \
        else SLOW
    cmd = [PY, os.path.join(HERE, "peers", "push_server.py"), "--impl", impl, "--mode", mode,
           "--count", str(count)]
    if pin:
        cmd = ["taskset", "-c", "0"] + cmd
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        scmd = [sink, "127.0.0.1", str(port), str(nconn), str(expect), "120"]
        if mode == "chat":
            scmd += [str(rate), str(secs)]
        if pin:
            scmd = ["taskset", "-c", "1"] + scmd
        env = dict(os.environ, PUSHSINK_STALLED=str(stalled))
        client = subprocess.Popen(scmd, stdout=subprocess.PIPE, text=True, env=env)
        assert client.stdout.readline().strip() == "connected"
        time.sleep(0.3)  # the last greetings' tasks are done
        cpu0 = cpu_seconds(server.pid)
        if mode != "chat":
            server.stdin.write("go\n")
            server.stdin.flush()
        out = client.stdout.readline()
        cpu1 = cpu_seconds(server.pid)
        client.wait(30)
        res = json.loads(out)
        res["server_cpu_s"] = cpu1 - cpu0
        res["cpu_us_per_delivery"] = (cpu1 - cpu0) * 1e6 / max(res["delivered"], 1)
        res["expected"] = expect if expect else res["sent"] * (nconn // 10)
        return res
    finally:
        server.kill()
        server.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--name", default=None)
    p.add_argument("--slow", action="store_true",
                   help="also: readers' latency with and without a subscriber that never reads")
    p.add_argument("--wakeups", action="store_true",
                   help="also measure pollpool's wake-fd writes per push (in-process)")
    args = p.parse_args()
    sink = build()
    scenarios = [s for s in args.scenarios.split(",") if s]
    runs: List[dict] = []
    for rep in range(args.repeats):
        for sc in scenarios:
            order = ["pollpool", "uvloop"] if rep % 2 == 0 else ["uvloop", "pollpool"]
            for impl in order:
                r = run_one(sink, sc, impl, not args.no_pin)
                r.update(scenario=sc, impl=impl, repeat=rep)
                runs.append(r)
                print(f"{sc:14} {impl:9} rep {rep}: {r['per_s']:>12,.0f}/s  "
                      f"cpu {r['cpu_us_per_delivery']:.3f} us/delivery  p99 {r['p99_us']:.0f} us  "
                      f"delivered {r['delivered']}/{r['expected']}  order errors {r['bad_order']}",
                      flush=True)
    summary: Dict[str, dict] = {}
    for sc in scenarios:
        row: Dict[str, object] = {}
        for field, better in (("per_s", "higher"), ("cpu_us_per_delivery", "lower"),
                              ("p99_us", "lower")):
            ratios = []
            for rep in range(args.repeats):
                a = [r for r in runs if r["scenario"] == sc and r["repeat"] == rep]
                pp = next(r for r in a if r["impl"] == "pollpool")[field]
                uv = next(r for r in a if r["impl"] == "uvloop")[field]
                if uv:
                    ratios.append(pp / uv)
            row[field] = {
                "pollpool": statistics.median(r[field] for r in runs
                                              if r["scenario"] == sc and r["impl"] == "pollpool"),
                "uvloop": statistics.median(r[field] for r in runs
                                            if r["scenario"] == sc and r["impl"] == "uvloop"),
                "ratio": statistics.median(ratios) if ratios else None,
                "ci90": median_ci(ratios) if len(ratios) >= 3 else None,
            }
        summary[sc] = row
    wake = measure_wakeups() if args.wakeups else None
    slow = None
    if args.slow:
        pairs = []
        for rep in range(args.repeats):
            order = [0, 1] if rep % 2 == 0 else [1, 0]
            got = {}
            for stalled in order:
                r = run_one(sink, "slow", "pollpool", not args.no_pin, stalled)
                r.update(scenario="slow", impl=f"pollpool+{stalled}stalled", repeat=rep)
                runs.append(r)
                got[stalled] = r
                print(f"slow feed      stalled={stalled} rep {rep}: p50 {r['p50_us']:.0f} us  "
                      f"p99 {r['p99_us']:.0f} us  delivered {r['delivered']}/{r['expected']}  "
                      f"order errors {r['bad_order']}", flush=True)
            pairs.append(got[1]["p99_us"] / max(got[0]["p99_us"], 1))
        slow = {"p99_without": statistics.median(r["p99_us"] for r in runs
                                                 if r["impl"] == "pollpool+0stalled"),
                "p99_with": statistics.median(r["p99_us"] for r in runs
                                              if r["impl"] == "pollpool+1stalled"),
                "ratio": statistics.median(pairs),
                "ci90": median_ci(pairs) if len(pairs) >= 3 else None}
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(),
            "kernel": platform.release(), "cpus": os.cpu_count(), "repeats": args.repeats,
            "pinned": not args.no_pin}
    try:
        import uvloop
        meta["uvloop"] = uvloop.__version__
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps({"summary": summary, "wakeups": wake, "slow": slow}, indent=1))
    if args.name:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, args.name + ".json"), "w") as f:
            json.dump({"meta": meta, "runs": runs, "summary": summary, "wakeups": wake,
                       "slow": slow}, f, indent=1)
        write_md(os.path.join(RESULTS, args.name + ".md"), meta, summary, wake, slow)
    return 0


def measure_wakeups() -> dict:
    """Pushes from 4 threads to 100 connections of a pollpool server in this
    process, with clients that read everything: wake-fd writes per push."""
    import socket
    import threading
    import pollpool
    srv = pollpool.Server(pollpool.handlers.echo, port=0, backend="epoll", push_limit=0)
    srv.start()
    socks = [socket.create_connection(srv.address) for _ in range(100)]
    stop = threading.Event()

    def drain(s):
        s.settimeout(0.5)
        while not stop.is_set():
            try:
                if not s.recv(1 << 16):
                    return
            except OSError:
                pass

    readers = [threading.Thread(target=drain, args=(s,), daemon=True) for s in socks]
    for r in readers:
        r.start()
    time.sleep(0.2)
    ids = list(range(1, 101))
    before = srv.stats()

    def one(t):
        for k in range(500):
            m = b"%d:%d:" % (t, k)
            for cid in ids:
                srv.send(cid, m)

    ts = [threading.Thread(target=one, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    time.sleep(0.5)
    after = srv.stats()
    stop.set()
    for s in socks:
        s.close()
    srv.stop()
    pushes = after["pushes"] - before["pushes"]
    wakeups = after["wakeups"] - before["wakeups"]
    return {"pushes": pushes, "wakeups": wakeups, "per_push": wakeups / max(pushes, 1)}


def write_md(path: str, meta: dict, summary: dict, wake: Optional[dict],
             slow: Optional[dict] = None) -> None:
    lines = [f"# Push benchmarks, {meta['date']}", "",
             f"Python {meta['python']}, uvloop {meta.get('uvloop')}, kernel {meta['kernel']}, "
             f"{meta['cpus']} CPUs, {meta['repeats']} repeats, "
             f"{'server on CPU 0, receiver on CPU 1' if meta['pinned'] else 'unpinned'}.", "",
             "| scenario | figure | pollpool | uvloop | ratio (median per repeat) | 90% CI |",
             "|---|---|---:|---:|---:|---:|"]
    names = {"per_s": "deliveries/s", "cpu_us_per_delivery": "server CPU µs/delivery",
             "p99_us": "delivery latency p99 µs"}
    for sc, row in summary.items():
        for field, name in names.items():
            v = row[field]
            ci = v["ci90"]
            lines.append(f"| {sc} | {name} | {v['pollpool']:,.3f} | {v['uvloop']:,.3f} | "
                         f"{v['ratio']:.2f}× | "
                         f"{'' if not ci else f'{ci[0]:.2f}–{ci[1]:.2f}'} |")
    if wake:
        lines += ["", f"Wake-fd writes: {wake['wakeups']} for {wake['pushes']} pushes from 4 "
                      f"threads to 100 connections ({wake['per_push']:.5f} per push)."]
    if slow:
        ci = slow["ci90"]
        lines += ["", "Slow subscriber (pollpool alone): 100 readers of 64 KiB broadcasts at 50/s; "
                      f"their delivery p99 {slow['p99_without']:.0f} µs without and "
                      f"{slow['p99_with']:.0f} µs with one subscriber that never reads "
                      f"(ratio {slow['ratio']:.2f}, 90% CI "
                      f"{'' if not ci else f'{ci[0]:.2f}–{ci[1]:.2f}'})."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
