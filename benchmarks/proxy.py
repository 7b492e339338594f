"""PROXY protocol cost, connection per request (issue 17's benchmark).

pollpool's native echo serves connections that each carry one request:
connect, (a PROXY v2 header,) "ping\\n", the reply, close.  The server runs
pinned to CPU 0, benchmarks/connrate.c on CPU 1 with 4 threads; each repeat
runs both modes, in alternating order, on a fresh server process each.
Reported: connections/s and the server's CPU per connection (its utime +
stime over the run, from /proc), with the per-repeat ratio on/off, its
median and 90% interval.

    python benchmarks/proxy.py [--repeats 7] [--duration 3] [--name NAME]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compare import BUILD, CFLAGS, PEERS, PY, RESULTS, ci_text, judge, median_ci  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def build() -> str:
    os.makedirs(BUILD, exist_ok=True)
    src, dst = os.path.join(HERE, "connrate.c"), os.path.join(BUILD, "connrate")
    if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
        subprocess.run([os.environ.get("CC", "cc"), *CFLAGS, "-pthread", "-o", dst, src],
                       check=True, timeout=120)
    return dst


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run(connrate: str, proxy: bool, duration: float) -> Dict[str, float]:
    cmd = ["taskset", "-c", "0", PY, os.path.join(PEERS, "pollpool_server.py"), "--handler",
           "native", "--threads", "2"] + (["--proxy-protocol"] if proxy else [])
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = srv.stdout.readline() if srv.stdout else ""
        m = re.search(r"listening on (\S+):(\d+)", line)
        if not m:
            raise RuntimeError(f"server did not start: {line!r}")
        cpu0 = cpu_seconds(srv.pid)
        out = subprocess.run(["taskset", "-c", "1", connrate, "--port", m.group(2), "--threads",
                              "4", "--duration", str(duration)] + (["--proxy"] if proxy else []),
                             capture_output=True, text=True, timeout=duration + 60, check=True)
        cpu = cpu_seconds(srv.pid) - cpu0
        r = json.loads(out.stdout)
        if r["errors"]:
            raise RuntimeError(f"{r['errors']} failed connections")
        return {"conns_per_s": r["connections"] / r["seconds"],
                "cpu_us_per_conn": cpu * 1e6 / r["connections"]}
    finally:
        srv.terminate()
        srv.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--name", default=None, help="write results/<name>.md and .json")
    args = ap.parse_args()
    connrate = build()
    runs: List[Dict[str, Dict[str, float]]] = []
    for i in range(args.repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        rep = {}
        for proxy in order:
            rep["on" if proxy else "off"] = run(connrate, proxy, args.duration)
            time.sleep(0.5)
        runs.append(rep)
        print(f"[{i + 1}/{args.repeats}] off {rep['off']['conns_per_s']:,.0f} conn/s "
              f"{rep['off']['cpu_us_per_conn']:.1f} µs/conn; on {rep['on']['conns_per_s']:,.0f} "
              f"conn/s {rep['on']['cpu_us_per_conn']:.1f} µs/conn", flush=True)
    lines = [f"# PROXY protocol v2, connection per request ({_dt.date.today()})", "",
             f"Command: `python benchmarks/proxy.py --repeats {args.repeats} --duration "
             f"{args.duration}" + (f" --name {args.name}`" if args.name else "`"), "",
             "| | off | on | ratio on/off (median, 90% CI) | target |", "|---|---:|---:|---:|---|"]
    for field, label, op, bound in (("conns_per_s", "connections/s", None, None),
                                    ("cpu_us_per_conn", "server CPU µs per connection", "<=", 1.05)):
        ratios = [r["on"][field] / r["off"][field] for r in runs]
        med = statistics.median(ratios)
        ci = median_ci(ratios)
        verdict = judge(ci, med, op, bound) if op else "reported"
        lines.append(f"| {label} | {statistics.median(r['off'][field] for r in runs):,.1f} | "
                     f"{statistics.median(r['on'][field] for r in runs):,.1f} | {med:.3f} "
                     f"({ci_text(ci)}) | {(op + ' ' + str(bound) + ': ') if op else ''}{verdict} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.name:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, args.name + ".md"), "w") as f:
            f.write(text)
        with open(os.path.join(RESULTS, args.name + ".json"), "w") as f:
            json.dump({"runs": runs, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
