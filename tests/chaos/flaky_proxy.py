"""A TCP proxy of the tests' own in front of the moto S3 server, for faults a real network has.

- `outage(seconds)`: every open connection is cut (both directions shut down) and new ones are refused (the
  listening socket is closed, so connects get ECONNREFUSED) for that long; then it listens again on the same port.
- `on_request`: called with (method, path) of each HTTP request line a client sends, before the bytes are passed
  on; a test uses it to act at an exact point of an upload (e.g. SIGKILL the run as the first file of an artifact
  is PUT, so its manifest can never follow).
"""
from __future__ import annotations

import re
import socket
import threading
import time
from typing import Callable

_REQUEST_RE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/[^ ?\r\n]*)(?:\?[^ \r\n]*)? HTTP/1\.[01]\r\n")


class FlakyProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.on_request: Callable[[str, str], None] | None = None
        self.requests: list[tuple[str, str]] = []
        self.cut = 0  # connections cut by outages
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="proxy-accept")
        self._acceptor.start()

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        return s

    def _accept_loop(self) -> None:
        while not self._closed:
            listener = self._listener
            try:
                client, _ = listener.accept()
            except OSError:  # closed for an outage (or for good): wait until we listen again
                while listener is self._listener and not self._closed:
                    time.sleep(0.05)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client:
                    for m in _REQUEST_RE.finditer(data):
                        req = (m.group(1).decode(), m.group(2).decode())
                        self.requests.append(req)
                        if self.on_request is not None:
                            self.on_request(*req)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def outage(self, seconds: float) -> None:
        """Cut every connection and refuse new ones for `seconds` (blocks for that long)."""
        old = self._listener
        old.close()
        with self._lock:
            conns = list(self._conns)
        self.cut += len(conns) // 2  # a client and its upstream socket
        for s in conns:
            self._drop(s)
        time.sleep(seconds)
        self._listener = self._listen(self.port)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._drop(s)
