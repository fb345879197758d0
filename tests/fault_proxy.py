"""A fault-injecting HTTP proxy on 127.0.0.1, in front of the GCS emulator, for the storage
fault tests (issue 25).

Stopping the emulator shows what a run does when its bucket vanishes; the faults a real
bucket gives are subtler: throttling (429), a backend unavailable for a moment (503), a
response that takes seconds, a connection that is accepted and never answered. The proxy
forwards every request to the emulator and applies :class:`Rule`s to the ones they match:
a status answered instead of the emulator's, a delay before forwarding, a hang (no answer
until the proxy stops), a reset (the connection closed unanswered). A rule can wait for a
trigger (the first request whose target contains a string, e.g. ``/export/``) so a fault
starts at a chosen moment of a run, and it counts what it did, so a test can assert that
the fault really happened.

The emulator writes its own URL into JSON bodies and ``Location`` headers (resumable
uploads); the proxy rewrites them to its own, so no client leaves the proxy mid-upload.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import socket
import threading
import time
import urllib.parse
from urllib.parse import unquote

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip


def _contains(request_line: str, parts: str | tuple[str, ...]) -> bool:
    return all(part in request_line for part in ((parts,) if isinstance(parts, str) else parts))


@dataclasses.dataclass
class Rule:
    """One fault: ``fault`` is ``"429"``/``"503"`` (any status), ``"stall:S"`` (forward
    after S seconds), ``"hang"`` or ``"reset"``; applied to the requests that contain
    ``match`` (all when empty), from the first request that contains ``trigger`` on (at
    once when empty), after letting ``after`` of them through, to every ``every``-th such
    request, at most ``count`` times (unbounded when None). A request is its method, target
    and an upload's metadata, unquoted (object names read ``a/b``); to contain a tuple is
    to contain each of its strings."""

    fault: str
    match: str | tuple[str, ...] = ""
    trigger: str | tuple[str, ...] = ""
    after: int = 0
    every: int = 1
    count: int | None = None
    applied: int = 0  # how many requests it faulted
    _armed: bool = False
    _seen: int = 0

    def wants(self, request_line: str) -> bool:
        """Whether this request is faulted (counts it); called under the proxy's lock."""
        if not self._armed and _contains(request_line, self.trigger):
            self._armed = True
        if not self._armed or not _contains(request_line, self.match):
            return False
        if self.count is not None and self.applied >= self.count:
            return False
        self._seen += 1
        if self._seen <= self.after or (self._seen - self.after - 1) % self.every:
            return False
        self.applied += 1
        return True


class FaultProxy:
    """The proxy: ``url`` to give the clients, ``rules`` to add faults to (or
    :meth:`inject`), :meth:`clear` to end them; ``requests`` counts what it forwarded."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self._upstream = urllib.parse.urlsplit(self.upstream)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules: list[Rule] = []
        self.requests = 0
        self.seen: list[str] = []  # what each request was, for a failing test's message
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # hung requests end
        self.server.shutdown()
        self.server.server_close()

    def inject(self, fault: str, **where) -> Rule:
        rule = Rule(fault, **where)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules = []

    def _fault_for(self, request_line: str) -> str | None:
        with self.lock:
            self.requests += 1
            self.seen.append(request_line[:300])
            for rule in self.rules:
                if rule.wants(request_line):
                    return rule.fault
        return None

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream.encode(), self.url.encode())

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if not size:
                            break
                        chunks.append(chunk)
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve(self) -> None:
                body = self._body()
                # An upload may name its object in the body (its metadata), not the URL.
                named = body[:4096].decode("latin-1") if self.command == "POST" else ""
                fault = proxy._fault_for(unquote(f"{self.command} {self.path} {named}"))
                if fault == "hang":
                    proxy.stopping.wait()
                    self.close_connection = True
                    return
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault and fault.startswith("stall:"):
                    time.sleep(float(fault.split(":", 1)[1]))
                elif fault:
                    message = b'{"error": {"code": %s, "message": "injected"}}' % fault.encode()
                    self._answer(int(fault), [("Content-Type", "application/json")], message)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                up = proxy._upstream
                connection = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Host"] = up.netloc
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                except OSError:  # the emulator itself is down: a refused connection
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                finally:
                    connection.close()
                kept = [
                    (k, proxy._rewrite(v.encode()).decode() if k.lower() == "location" else v)
                    for k, v in response.getheaders()
                    if k.lower() not in HOP_BY_HOP
                ]
                if "json" in (response.getheader("Content-Type") or ""):
                    data = proxy._rewrite(data)
                if self.command == "HEAD":
                    self.send_response(response.status)
                    for name, value in kept:
                        self.send_header(name, value)
                    length = response.getheader("Content-Length")
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    return
                self._answer(response.status, kept, data)

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (TimeoutError, ConnectionError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

        return Handler
