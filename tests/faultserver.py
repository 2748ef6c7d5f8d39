"""A scripted loopback HTTP server standing in for the diode plugin, only to inject faults.

Each request to a path takes the next scripted step for that path (or the path's default):
a status with a JSON body (or raw bytes), optional headers, an optional delay, or a function of
the parsed request body that builds the answer. Every request is recorded for the test to check.
Behaviour is tested against the real NetBox; this server exists for what NetBox will not do on
demand: 5xx, timeouts, 429, 404 on the bulk endpoints, malformed bodies.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Step:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    answer: Callable[[Any], Step] | None = None  # computes the step from the request body


@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    body: Any


def plan_for(entity_id: str, changes: int = 1, object_type: str = "dcim.site") -> dict:
    """A plausible change set for one entity, with `changes` create changes."""
    return {"id": f"cs-{entity_id}", "branch": None, "changes": [
        {"id": f"ch-{entity_id}-{n}", "change_type": "create", "object_type": object_type, "object_id": None,
         "ref_id": f"new_object:{object_type}:{entity_id}-{n}", "object_primary_value": f"obj-{entity_id}",
         "before": {}, "data": {"name": f"obj-{entity_id}"}, "new_refs": []} for n in range(changes)]}


def converge(body: Any, apply: bool = True) -> Step:
    """Every entity planned (and applied) with one change: what a healthy plugin answers."""
    results = [{"id": e["id"], "change_set": plan_for(e["id"], object_type=e["object_type"]), "errors": None}
               for e in body["entities"]]
    return Step(200, {"results": results})


class FaultServer:
    def __init__(self) -> None:
        self.scripts: dict[str, deque[Step]] = defaultdict(deque)
        self.defaults: dict[str, Step] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # or every keep-alive answer waits 40 ms for a delayed ACK

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                server._handle(self, None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                server._handle(self, body)

        self._handler = Handler
        self._listen(0)
        self.url = f"http://127.0.0.1:{self.port}/api/plugins/diode"

    def _listen(self, port: int) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        # A short poll: close() (shutdown) waits for the loop to see it, 0.5 s per server by default.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def go_down(self) -> None:
        """The plugin's host goes away: nothing listens on its port, and open connections are cut."""
        self.close()
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def come_back(self) -> None:
        """Listen again on the same port, with the same scripts."""
        self._listen(self.port)

    def script(self, path: str, *steps: Step) -> None:
        self.scripts[path].extend(steps)

    def default(self, path: str, step: Step) -> None:
        self.defaults[path] = step

    def calls(self, path: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_step(self, path: str) -> Step:
        with self._lock:
            if self.scripts[path]:
                return self.scripts[path].popleft()
            return self.defaults.get(path, Step(404, b"<html>Not Found</html>"))

    def _handle(self, handler: BaseHTTPRequestHandler, body: Any) -> None:
        # Plugin paths relative to the plugin (`bulk-plan/`), NetBox's own whole (`/api/core/...`); no query.
        path = handler.path.split("?", 1)[0].split("/api/plugins/diode/", 1)[-1]
        with self._lock:
            self.seen.append(Seen(handler.command, path, dict(handler.headers), body))
        step = self._next_step(path)
        delay = step.delay
        if step.answer is not None:
            step = step.answer(body)
        time.sleep(delay + step.delay)
        data = step.body if isinstance(step.body, bytes) else json.dumps(step.body).encode()
        try:
            handler.send_response(step.status)
            for name, value in {"Content-Type": "application/json", **step.headers}.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)
