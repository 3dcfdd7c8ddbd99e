"""A small TCP proxy for the tests and ``scripts/chaos.py``: it sits between clients and
redis-server and, now and then, drops a connection or stalls it, the way a flaky network
or a load balancer does.

Faults hit replies (server to client) only, at the worst moment: a reply Redis has sent,
and acted on, that never reaches the client. Which replies are hit is drawn from a seeded
random generator, so a run can be repeated.
"""

from __future__ import annotations

import random
import select
import socket
import threading
from dataclasses import dataclass

from workers.embedded_redis import free_port


@dataclass
class ProxyStats:
    """What the proxy did. Written by the connection threads (under the proxy's lock)."""

    connections: int = 0
    dropped: int = 0
    stalled: int = 0


class FlakyProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``target_port``. Each reply chunk is
    dropped with its connection with probability ``drop``, or held for ``stall_s`` seconds
    before being passed on with probability ``stall``. ``faulty`` turns faults on and off."""

    def __init__(
        self, target_port: int, *, drop: float = 0.0, stall: float = 0.0, stall_s: float = 0.0,
        seed: int = 0,
    ) -> None:  # fmt: skip
        self.target_port = target_port
        self.port = free_port()
        self.drop = drop
        self.stall = stall
        self.stall_s = stall_s
        self.faulty = threading.Event()
        self.faulty.set()
        self.stats = ProxyStats()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.stats.connections += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _fault(self) -> str | None:
        if not self.faulty.is_set():
            return None
        with self._lock:
            draw = self._random.random()
            if draw < self.drop:
                self.stats.dropped += 1
                return "drop"
            if draw < self.drop + self.stall:
                self.stats.stalled += 1
                return "stall"
        return None

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        """Both directions of one connection, until either side closes or a drop."""
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([client, server], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is client:
                        server.sendall(data)
                        continue
                    fault = self._fault()
                    if fault == "drop":
                        return
                    if fault == "stall":
                        self._closed.wait(self.stall_s)
                    client.sendall(data)
        except OSError:
            return
        finally:
            # RST rather than FIN on a drop, like a connection cut in the middle.
            for sock in (client, server):
                try:
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    sock.close()
                except OSError:
                    pass
