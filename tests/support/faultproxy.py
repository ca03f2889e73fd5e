"""A fault-injecting HTTP proxy for tests: put it in front of the moto S3 server and point the
clients' endpoint at it. On a set share of requests it answers 503 SlowDown, 500 InternalError or
resets the connection instead of forwarding (the request never reaches the store); `down` fails
every request, and `down_after` turns it down once some requests went through; `hold` parks a
matching request (e.g. the commit of an upload), so a test can kill the writer while it waits.
It counts what it forwarded and what it injected."""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("503", "500", "reset")
_ERROR_XML = {"503": ("SlowDown", "Please reduce your request rate."),
              "500": ("InternalError", "We encountered an internal error. Please try again.")}
# Hop-by-hop headers and the ones the proxy rewrites; the rest go through unchanged.
_DROP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS, seed: int = 0):
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port
        self.fault_rate, self.faults = fault_rate, tuple(faults)
        self.down = False
        self.counts: Counter = Counter()      # requests, forwarded, and one entry per injected fault
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._hold: tuple[str, re.Pattern] | None = None
        self._hold_skip = 0
        self._down_after: tuple[str, re.Pattern] | None = None
        self._down_countdown = 0
        self.held = threading.Event()         # set when a request has been parked
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def hold(self, method: str, path_pattern: str, skip: int = 0) -> None:
        """Park (never forward) the first matching request after `skip` matching ones went
        through, until release() resets its connection; `held` is set when it arrives."""
        self._hold, self._hold_skip, self.held = (method, re.compile(path_pattern)), skip, threading.Event()
        self._release.clear()

    def down_after(self, method: str, path_pattern: str, count: int) -> None:
        """Go down (every request 503) once `count` matching requests were forwarded."""
        self._down_after, self._down_countdown = (method, re.compile(path_pattern)), count

    def release(self) -> None:
        self._hold = None
        self._release.set()

    def injected(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind in FAULTS)

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self._hold is not None and method == self._hold[0] and self._hold[1].search(path):
                if self._hold_skip <= 0:
                    self._hold = None
                    return "hold"
                self._hold_skip -= 1
            if self._down_after is not None and method == self._down_after[0] and self._down_after[1].search(path):
                self._down_countdown -= 1
                if self._down_countdown < 0:
                    self.down, self._down_after = True, None
            if self.down:
                fault = "503"
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
            else:
                self.counts["forwarded"] += 1
                return None
            self.counts[fault] += 1
            return fault

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs expect

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                # Headers and body go out as separate writes: without this, Nagle's algorithm and
                # the client's delayed ACK add 40 ms to every answer.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout: close() sends RST, as a dropped connection does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in _DROP:
                        self.send_header(name, value)
                # A HEAD answer has no body but tells the object's length.
                length = next((v for k, v in headers if k.lower() == "content-length"), None)
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._decide(self.command, self.path)
                if fault == "hold":
                    proxy.held.set()
                    proxy._release.wait()
                    return self._reset()
                if fault == "reset":
                    return self._reset()
                if fault in _ERROR_XML:
                    code, message = _ERROR_XML[fault]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
                    return self._send(int(fault), [("Content-Type", "application/xml")], xml)
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROP}
                    upstream.request(self.command, self.path, body=body if body or self.command in
                                     ("PUT", "POST") else None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self._send(response.status, response.getheaders(), data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
