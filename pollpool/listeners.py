"""Where a server listens: ``bind=`` strings, sockets given with ``sock=``,
and sockets systemd passes (socket activation), plus systemd's notify socket.

Bind strings are gunicorn's and hypercorn's spelling:

- ``HOST:PORT`` (``[::1]:9000`` for IPv6; a name binds every address it
  resolves to; port 0 picks one, shared by all of them),
- ``unix:PATH`` (``unix_mode`` sets its permissions; a stale file a dead
  server left is replaced, a live server's is never taken: EADDRINUSE; the
  file is removed when the server stops),
- ``fd://N`` (an inherited socket; listened on if it only was bound),
- ``systemd`` (the sockets of sd_listen_fds(3): ``LISTEN_PID`` must name
  this process; the variables are cleared so children do not misread them).

Every socket is handed to the C core, which serves duplicates of them on its
one I/O thread; the ones made here are closed when the server stops.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

SD_LISTEN_FDS_START = 3

log = logging.getLogger("pollpool")


@dataclass
class Listener:
    sock: socket.socket
    spec: str                   # as bound: "127.0.0.1:9000", "unix:/run/x.sock", "fd://3"
    owned: bool = True          # closed with the server (False: sock= is the caller's)
    path: Optional[str] = None  # a Unix socket file made here, removed at the end
    #: (host, port) of a TCP listener, else None; read at once, since our
    #: own copy of the socket is closed once the core holds its duplicate.
    tcp: Optional[Tuple[str, int]] = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = self.sock.getsockname()[:2]
            self.tcp = (str(host), int(port))


def _spec_of(sock: socket.socket, fallback: str) -> str:
    if sock.family == socket.AF_INET:
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"
    if sock.family == socket.AF_INET6:
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}"
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return f"unix:{name}" if name else fallback
    return fallback


def _check_stream(sock: socket.socket, what: str, backlog: int) -> None:
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"{what} is not a stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        try:
            sock.listen(backlog)   # bound only: listen, as asyncio's sock= does
        except OSError as e:
            raise OSError(e.errno, f"{what} cannot listen: {os.strerror(e.errno or 0)}") from None


def parse_bind(spec: str) -> Tuple[Any, ...]:
    """("tcp", host, port) | ("unix", path) | ("fd", n) | ("systemd",)."""
    if not isinstance(spec, str) or not spec:
        raise TypeError("bind entries must be non-empty str such as '127.0.0.1:9000'")
    if spec == "systemd":
        return ("systemd",)
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ValueError(f"bind {spec!r}: no path")
        return ("unix", path)
    if spec.startswith("fd://"):
        try:
            n = int(spec[5:])
        except ValueError:
            raise ValueError(f"bind {spec!r}: fd:// takes a file descriptor number") from None
        if n < 0:
            raise ValueError(f"bind {spec!r}: a negative file descriptor")
        return ("fd", n)
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bind {spec!r}: IPv6 is written [ADDR]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = spec.rpartition(":")
        if not sep:
            raise ValueError(f"bind {spec!r}: expected HOST:PORT, unix:PATH, fd://N or systemd")
        if ":" in host:
            raise ValueError(f"bind {spec!r}: write an IPv6 address as [ADDR]:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bind {spec!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bind {spec!r}: the port must be between 0 and 65535")
    return ("tcp", host, port)


def _tcp(host: str, port: int, backlog: int, reuse_port: bool) -> List[Listener]:
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {host}:{port}: {e}") from None
    out: List[Listener] = []
    chosen = port
    try:
        for family, type_, proto, _, addr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            s = socket.socket(family, type_, proto)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr[0], chosen) + tuple(addr[2:]))
                s.listen(backlog)
            except OSError as e:
                s.close()
                raise OSError(e.errno, f"cannot listen on {host}:{port}: "
                                       f"{os.strerror(e.errno or 0)}") from None
            chosen = s.getsockname()[1]
            out.append(Listener(s, _spec_of(s, f"{host}:{port}")))
    except BaseException:
        close_all(out)
        raise
    if not out:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {host}:{port}")
    return out


def _unix(path: str, backlog: int, mode: Optional[int]) -> Listener:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EADDRINUSE, f"cannot listen on unix:{path}: "
                                            "the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)    # a dead server's: replaced
        except OSError:
            pass               # bind below tells what is wrong
        else:
            raise OSError(errno.EADDRINUSE, f"cannot listen on unix:{path}: "
                                            "a live server listens there")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        try:
            if mode is not None:
                os.chmod(path, mode)   # before listen(): no one connects in between
            s.listen(backlog)
        except BaseException:
            os.unlink(path)
            raise
    except OSError as e:
        s.close()
        raise OSError(e.errno, f"cannot listen on unix:{path}: "
                               f"{os.strerror(e.errno or 0)}") from None
    except BaseException:
        s.close()
        raise
    return Listener(s, f"unix:{path}", path=path)


def _check_count(listeners: List[Listener], limit: int) -> None:
    if len(listeners) > limit:
        n = len(listeners)
        close_all(listeners)
        raise ValueError(f"{n} listening sockets; a server serves at most {limit}")


def systemd_listeners(backlog: int, limit: int) -> List[Listener]:
    """The sockets systemd passed this process (sd_listen_fds(3)), or [];
    the variables are cleared either way once they name this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in os.environ else []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    out: List[Listener] = []
    try:
        for i in range(n):
            fd = SD_LISTEN_FDS_START + i
            name = names[i] if i < len(names) and names[i] else f"fd{fd}"
            try:
                s = socket.socket(fileno=fd)
            except OSError as e:
                raise OSError(e.errno, f"systemd passed fd {fd} ({name}), which is not a socket") \
                    from None
            out.append(Listener(s, f"systemd:{name}"))
            _check_stream(s, f"systemd's fd {fd} ({name})", backlog)
            out[-1].spec = _spec_of(s, f"systemd:{name}")
            log.info("systemd socket %s (fd %d): %s", name, fd, out[-1].spec)
    except BaseException:
        close_all(out)
        raise
    _check_count(out, limit)
    return out


def open_listeners(binds: Sequence[str], socks: Sequence[Any], backlog: int,
                   reuse_port: bool, unix_mode: Optional[int], limit: int) -> List[Listener]:
    """Every listener asked for, or none (whatever was opened is closed)."""
    out: List[Listener] = []
    try:
        for spec in binds:
            kind = parse_bind(spec)
            if kind[0] == "tcp":
                out += _tcp(kind[1], kind[2], backlog, reuse_port)
            elif kind[0] == "unix":
                out.append(_unix(kind[1], backlog, unix_mode))
            elif kind[0] == "fd":
                try:
                    s = socket.socket(fileno=kind[1])
                except OSError as e:
                    raise OSError(e.errno, f"bind {spec!r}: not a socket: "
                                           f"{os.strerror(e.errno or 0)}") from None
                out.append(Listener(s, spec))
                _check_stream(s, f"bind {spec!r}", backlog)
                out[-1].spec = _spec_of(s, spec)
            else:
                got = systemd_listeners(backlog, limit)
                if not got:
                    raise ValueError("bind 'systemd': no sockets from systemd (LISTEN_PID does "
                                     "not name this process, or LISTEN_FDS is 0)")
                out += got
        for s in socks:
            if not isinstance(s, socket.socket):
                raise TypeError(f"sock must be a socket.socket, not {type(s).__name__}")
            _check_stream(s, f"sock {s!r}", backlog)
            out.append(Listener(s, _spec_of(s, f"fd://{s.fileno()}"), owned=False))
    except BaseException:
        close_all(out)
        raise
    _check_count(out, limit)
    return out


def close_all(listeners: List[Listener]) -> None:
    for lst in listeners:
        if lst.owned:
            lst.sock.close()
        if lst.path is not None:
            try:
                os.unlink(lst.path)
            except OSError:
                pass
    listeners.clear()


def notify_socket() -> Optional[socket.socket]:
    """A datagram socket connected to $NOTIFY_SOCKET (systemd's Type=notify),
    or None; the variable is cleared so that children do not notify."""
    path = os.environ.pop("NOTIFY_SOCKET", None)
    if not path:
        return None
    addr = "\0" + path[1:] if path.startswith("@") else path
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(addr)
    except OSError:
        s.close()
        return None
    return s


def notify(sock: Optional[socket.socket], message: bytes) -> None:
    if sock is None:
        return
    try:
        sock.send(message, socket.MSG_DONTWAIT)
    except OSError:
        pass   # a manager that went away is no reason to stop serving
