"""A fault-injecting HTTP proxy for tests: put it in front of the real SeaweedFS (S3) or MLflow server
and make chosen requests fail (5xx, S3 throttling), stall (timeouts) or lose their connection.

    with FaultProxy("127.0.0.1", s3_port) as proxy:
        proxy.add(Fault(method="PUT", path=r"/CURRENT\\.json$", status=503, times=2))
        client = make_client(proxy.endpoint, ...)      # the code under test talks to the proxy

Requests are forwarded byte for byte (the Host header too, so S3 SigV4 signatures stay valid); every
request is recorded in ``proxy.log`` as ``(method, path, outcome)``. Rules are checked in order and the
first one that matches and still has ``times`` left is applied.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
               b"<Message>Please reduce your request rate.</Message></Error>")
S3_INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
               b"<Message>We encountered an internal error. Please try again.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade"}


@dataclass
class Fault:
    """One rule. ``status``: answer with it instead of forwarding (``body`` defaults to an S3-style
    error); ``delay``: wait this long before forwarding (longer than the client's read timeout = a
    timeout); ``reset``: close the connection without an answer; ``truncate``: forward, then cut the
    answer's body in half and hang up (a partial download); ``after``: forward the request first,
    then fail the answer (the server did the work, the client never hears of it). ``times``: how many
    matching requests it applies to (``None`` = all); ``skip``: let this many matches through first."""

    method: str | None = None
    path: str | None = None  # regex searched in the request path (with query string)
    status: int | None = None
    body: bytes | None = None
    delay: float = 0.0
    reset: bool = False
    after: bool = False
    truncate: bool = False  # forward, then send the headers and only half of the body, and hang up
    times: int | None = 1
    skip: int = 0
    hits: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or re.search(self.path, path))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # quiet
        pass

    def _any(self):
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = proxy._take(self.command, self.path)
        outcome = "forwarded"
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
            outcome = f"delayed {fault.delay}s"
        if fault is not None and not fault.after and (fault.reset or fault.status):
            proxy._record(self.command, self.path, "reset" if fault.reset else str(fault.status))
            return self._fail(fault)
        try:
            status, reason, headers, data = proxy._forward(self.command, self.path, self.headers, body)
        except OSError as exc:  # upstream down: what a client sees from a dead server
            proxy._record(self.command, self.path, f"upstream error {exc}")
            return self._close()
        if fault is not None and fault.truncate:
            proxy._record(self.command, self.path, f"truncated {status}")
            self.send_response(status, reason)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._close()
        if fault is not None and fault.after:
            proxy._record(self.command, self.path, f"{'reset' if fault.reset else fault.status} after forwarding")
            return self._fail(fault)
        proxy._record(self.command, self.path, f"{outcome} {status}")
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _fail(self, fault: Fault):
        if fault.reset:
            return self._close()
        body = fault.body if fault.body is not None else (S3_SLOWDOWN if fault.status == 503 else S3_INTERNAL)
        self.send_response(int(fault.status))
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if fault.status in (429, 503):
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _close(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"


class FaultProxy:
    """A forwarding proxy on a free loopback port in front of ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (upstream_host, int(upstream_port))
        self._server = _Server((host, 0), _Handler)
        self._server.proxy = self
        self.host, self.port = self._server.server_address[:2]
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.upstream_down = False  # True: every request is refused as if the server were stopped

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add(self, *faults: Fault) -> "FaultProxy":
        with self._lock:
            self.faults.extend(faults)
        return self

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.upstream_down = False

    def injected(self) -> list[tuple[str, str, str]]:
        """The requests that got a fault (not plainly forwarded)."""
        return [r for r in self.log if not r[2].startswith("forwarded")]

    def count(self, method: str, path: str) -> int:
        """Requests seen for ``method`` and a ``path`` regex (faulted or not)."""
        return sum(1 for m, p, _ in self.log if m == method and re.search(path, p))

    # -- internals
    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            if self.upstream_down:
                return Fault(reset=True)
            for f in self.faults:
                if not f.matches(method, path):
                    continue
                f.seen += 1
                if f.seen <= f.skip:
                    continue
                if f.times is not None and f.hits >= f.times:
                    continue
                f.hits += 1
                return f
        return None

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, path, outcome))

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()
