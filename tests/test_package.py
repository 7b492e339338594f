"""The package as installed: one version everywhere, the files a user needs."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pollpool


def test_version_agrees_with_the_package_metadata_and_the_cli():
    meta = importlib.metadata.version("pollpool")
    assert pollpool.__version__ == meta
    res = subprocess.run([sys.executable, "-m", "pollpool", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"pollpool {meta}"


def test_the_header_and_the_type_marker_are_where_a_user_looks():
    inc = pollpool.get_include()
    assert os.path.isfile(os.path.join(inc, "pollpool.h")), inc
    assert os.path.isfile(os.path.join(os.path.dirname(pollpool.__file__), "py.typed"))


def test_the_handler_types_are_public():
    for name in ("Handler", "MessageHandler", "ConnectionHandler", "OnConnect", "OnMessage",
                 "OnDisconnect", "Reply"):
        assert name in pollpool.__all__ and getattr(pollpool, name) is getattr(pollpool.types, name)
