"""A small network of Linux network namespaces for tests that need real
peers on real addresses: namespaces joined by veth pairs, with addresses in
the benchmarking range 198.18.0.0/15, which exists only inside them.

    with Network() as net:
        net.add("cli"); net.add("lb")
        net.link("cli", "198.18.1.2", "lb", "198.18.1.1")    # a /24 between them
        child = net.spawn("lb", ["haproxy", "-f", cfg, "-db"], tmp_path)

Every namespace (and with it every veth and every process still in it) is
removed on exit.  Namespaces need root: ``Network.available()`` says why not
otherwise, for a clear skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from conftest import Child, subprocess_env


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Network:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.ns: Dict[str, str] = {}
        self.children: List[Child] = []
        self._links = 0

    @staticmethod
    def available() -> Optional[str]:
        """None if namespaces can be made here, else the reason."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        name = f"pp-probe-{uuid.uuid4().hex[:6]}"
        try:
            _ip("netns", "add", name)
        except (OSError, subprocess.SubprocessError) as e:
            return f"'ip netns add' refused: {e}"
        _ip("netns", "del", name)
        return None

    def add(self, role: str) -> str:
        name = f"pp-{role}-{self.tag}"
        _ip("netns", "add", name)
        self.ns[role] = name
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, a: str, addr_a: str, b: str, addr_b: str, prefix: int = 24) -> None:
        """A veth pair between namespaces a and b, with these addresses."""
        self._links += 1
        va, vb = f"v{self._links}a{self.tag}", f"v{self._links}b{self.tag}"
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", self.ns[a])
        _ip("link", "set", vb, "netns", self.ns[b])
        _ip("-n", self.ns[a], "addr", "add", f"{addr_a}/{prefix}", "dev", va)
        _ip("-n", self.ns[b], "addr", "add", f"{addr_b}/{prefix}", "dev", vb)
        _ip("-n", self.ns[a], "link", "set", va, "up")
        _ip("-n", self.ns[b], "link", "set", vb, "up")

    def spawn(self, role: str, args: List[str], tmp: Path) -> Child:
        """args run inside the namespace; stdout collected, stderr to a file."""
        n = len(self.children)
        child = Child(["ip", "netns", "exec", self.ns[role], *args], cwd=tmp,
                      env=subprocess_env(), stderr_path=tmp / f"{role}{n}.stderr")
        self.children.append(child)
        return child

    def python(self, role: str, args: List[str], tmp: Path) -> Child:
        return self.spawn(role, [sys.executable, *args], tmp)

    def run(self, role: str, args: List[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns[role], *args], env=subprocess_env(),
                              capture_output=True, timeout=timeout)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            child.kill()
        for name in self.ns.values():
            # A process left in a namespace would keep it (and its veths).
            out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, timeout=10)
            for pid in out.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


@contextlib.contextmanager
def balancer_network(backends: List[str]) -> Iterator[Network]:
    """A client (198.18.1.2), a balancer (198.18.1.1 towards it) and each
    backend k (198.18.k+2.2, the balancer 198.18.k+2.1 towards it); skips
    without namespaces, fails without HAProxy (.ci/run installs it)."""
    import pytest
    why = Network.available()
    if why:
        pytest.skip(f"no network namespaces here: {why}")
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed (.ci/run installs Debian's package)")
    with Network() as net:
        for role in ("cli", "lb", *backends):
            net.add(role)
        net.link("cli", "198.18.1.2", "lb", "198.18.1.1")
        for k, role in enumerate(backends):
            net.link("lb", f"198.18.{k + 2}.1", role, f"198.18.{k + 2}.2")
        yield net

