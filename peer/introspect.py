"""Stand-in for Diode's auth service: answers the plugin's token introspection on loopback.

Stdlib only; run as ``python introspect.py PORT``. Answers by token prefix:
``invalid*`` (or empty) inactive, ``ro-*`` netbox:read, ``noscope-*`` no scope, ``diode-read-*``
diode:read (a reader of the reconciler's read API, which introspects too), else read+write.
``GET /health`` reports how many introspections were answered (to check the plugin's cache).
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_LIFETIME = 3600  # exp - iat: the plugin caches a positive answer this long
_calls = 0
_calls_lock = threading.Lock()


def introspection(token):
    """The JSON answer for one bearer token."""
    if not token or token.startswith("invalid"):
        return {"active": False}
    if token.startswith("ro-"):
        scope = "netbox:read"
    elif token.startswith("noscope-"):
        scope = ""
    elif token.startswith("diode-read-"):
        scope = "diode:read"
    else:
        scope = "netbox:read netbox:write"
    now = int(time.time())
    return {"active": True, "scope": scope, "client_id": "netbox-peer-test", "sub": "netbox-peer-test",
            "token_type": "Bearer", "iat": now, "exp": now + TOKEN_LIFETIME}


class Handler(BaseHTTPRequestHandler):
    # Without this, the small response is held back by Nagle + delayed ACK: 40 ms per call.
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global _calls
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the plugin sends no body
        if self.path.rstrip("/") != "/auth/introspect":
            return self._send(404, {"error": "not found", "path": self.path})
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else ""
        with _calls_lock:
            _calls += 1
        self._send(200, introspection(token))

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", "/auth/health"):
            return self._send(200, {"ok": True, "introspect_calls": _calls})
        self._send(404, {"error": "not found", "path": self.path})

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass  # one line per call would only fill the log


def main():
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
