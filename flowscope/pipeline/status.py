"""The agent's status API: HTTP on a unix socket (mode 0660, root's group) and, when asked, on a loopback TCP
address. `GET /healthz` answers 200 "ok" while the agent runs as it should, else 503 and why; `GET /status`
answers the pipeline's status as JSON (uptime, probes, coverage by source and by sink, queue fill)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


class StatusError(RuntimeError):
    """The status API cannot be served or reached; the message says what to do."""


def health(status: dict[str, Any]) -> tuple[bool, str]:
    """Whether an agent with this status is healthy, and if not, why (one sentence)."""
    failing = [name for name, sink in status["sinks"].items() if sink["health"].get("state") == "failing"]
    if failing:
        return False, f"sink {', '.join(failing)} failing"
    if not any(p["active"] for p in status["probes"]):
        return False, "no probe runs"
    return True, "ok"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/healthz", "/status"):
            self._send(404, "text/plain", b"not found: the status API has /healthz and /status\n")
            return
        try:
            status = self.server.status()
        except Exception as err:  # the API must answer even when the status cannot be read
            self._send(500, "text/plain", f"status unreadable: {err}\n".encode())
            return
        if path == "/healthz":
            ok, why = health(status)
            self._send(200 if ok else 503, "text/plain", f"{why}\n".encode())
        else:
            self._send(200, "application/json", json.dumps(status, indent=1).encode() + b"\n")

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # requests are not worth a log line each
        log.debug("status API: " + format, *args)

    def address_string(self) -> str:  # a unix socket's peer has no host
        return "local"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Any, status: Callable[[], dict[str, Any]], family: int) -> None:
        self.address_family = family
        self.status = status
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_UNIX:
            socketserver.TCPServer.server_bind(self)  # HTTPServer's looks up a host name
            self.server_name, self.server_port = "localhost", 0
        else:
            super().server_bind()


class StatusServer:
    """Serves /healthz and /status from `status()` on `socket_path` and, optionally, on `address`."""

    def __init__(self, status: Callable[[], dict[str, Any]], socket_path: str, address: str | None = None) -> None:
        self._servers: list[_Server] = []
        self.socket_path = socket_path
        try:
            self._servers.append(_unix_server(socket_path, status))
            if address:
                self._servers.append(_tcp_server(address, status))
        except BaseException:
            self.close()
            raise
        for server in self._servers:
            threading.Thread(target=server.serve_forever, name="flowscope-status", daemon=True).start()

    @property
    def tcp_port(self) -> int | None:
        tcp = [s for s in self._servers if s.address_family != socket.AF_UNIX]
        return tcp[0].server_address[1] if tcp else None

    @property
    def addresses(self) -> list[str]:
        """Where it answers: the socket's path, then the TCP address as bound (port 0 asks for a free port)."""
        shown = [self.socket_path]
        for server in self._servers:
            if server.address_family != socket.AF_UNIX:
                host, port = server.server_address[:2]
                shown.append(f"[{host}]:{port}" if server.address_family == socket.AF_INET6 else f"{host}:{port}")
        return shown

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        if self._servers and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._servers = []


def _unix_server(path: str, status: Callable[[], dict[str, Any]]) -> _Server:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        claim_socket(path, "--status-socket")
        previous = os.umask(0o117)  # the socket is created 0660: root and its group only
        try:
            server = _Server(path, status, socket.AF_UNIX)
        finally:
            os.umask(previous)
    except OSError as err:
        raise StatusError(f"cannot serve the status API on {path} ({err.strerror}); choose --status-socket.") from None
    os.chmod(path, SOCKET_MODE)
    return server


def claim_socket(path: str, flag: str) -> None:
    """Makes `path` free for a new unix socket: a socket file left by an agent that is gone is removed; one that
    answers belongs to a running agent (StatusError, naming `flag`)."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise StatusError(f"another flowscope agent answers on {path}; stop it, or choose another {flag}.")


def _tcp_server(address: str, status: Callable[[], dict[str, Any]]) -> _Server:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        raise StatusError(f"--status-addr {address!r} is not HOST:PORT with an IP address.") from None
    if not loopback:
        raise StatusError(
            f"--status-addr {address}: the status API serves TCP on loopback only; use the unix socket elsewhere."
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return _Server((host, number), status, family)
    except OSError as err:
        raise StatusError(f"cannot serve the status API on {address} ({err.strerror}).") from None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def fetch(socket_path: str, path: str = "/status", timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `path` from the agent's status socket: (HTTP status, body)."""
    connection = _UnixConnection(socket_path, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except FileNotFoundError:
        raise StatusError(f"no agent serves {socket_path}; start one with `flowscope agent`.") from None
    except PermissionError:
        raise StatusError(f"{socket_path} is root's: run `sudo flowscope agent status`.") from None
    except (OSError, http.client.HTTPException) as err:
        raise StatusError(f"the agent at {socket_path} did not answer ({err}).") from None
    finally:
        connection.close()
