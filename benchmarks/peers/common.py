"""What every Python peer shares: the handlers and the command line.

Handlers take one message (bytes, framing removed) and return the reply
(bytes, framing to be added) -- the same contract as a pollpool handler, so
every server does the same work per message.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import resource
import sys
import time
from typing import Callable, Dict


def echo(message: bytes) -> bytes:
    return message


def sleep1ms(message: bytes) -> bytes:
    # Stands in for a blocking call (a database query): the GIL is released.
    time.sleep(0.001)
    return message


def sha256(message: bytes) -> bytes:
    # CPU work that releases the GIL for large inputs (hashlib does, above 2 KiB).
    return hashlib.sha256(message).hexdigest().encode()


async def aecho(message: bytes) -> bytes:
    return message


async def asleep1ms(message: bytes) -> bytes:
    # Stands in for an awaited call (asyncpg, aiohttp): the loop is free meanwhile.
    await asyncio.sleep(0.001)
    return message


#: Coroutine versions, for the servers that await them.
ASYNC_HANDLERS = {"echo": aecho, "sleep1ms": asleep1ms}

HANDLERS: Dict[str, Callable[[bytes], bytes]] = {
    "echo": echo,
    "sleep1ms": sleep1ms,
    "sha256": sha256,
}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = ephemeral (default)")
    p.add_argument("--handler", choices=sorted(HANDLERS), default="echo")
    p.add_argument("--backlog", type=int, default=4096)
    return p


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def announce(host: str, port: int) -> None:
    print(f"listening on {host}:{port}", flush=True)
    sys.stdout.flush()
