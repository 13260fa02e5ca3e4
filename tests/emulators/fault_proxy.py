"""A loopback HTTP proxy that injects faults in front of fake-gcs-server, for the GCS tests.

`FaultProxy(upstream)` forwards every request to `upstream` (``http://127.0.0.1:PORT``), except
that a request whose path holds the text of a rule (an object name, URL-encoded as clients send
it) is answered by the rule while it has answers left:

    proxy.fail("flaky-503.dcm", status=503, times=2)   # two 503s, then the real answer
    proxy.fail("slow.dcm", delay=3.0, times=1)          # one answer after 3 s (client timeouts)
    proxy.fail("secret.dcm", status=403)                # always 403

`proxy.hits(text)` counts the requests that matched `text`, answered or forwarded.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
import urllib.parse


class FaultProxy:
    def __init__(self, upstream: str):
        self._upstream = urllib.parse.urlparse(upstream)
        self._rules: list[dict] = []
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail(self, text: str, *, status: int = 503, times: int | None = None, delay: float = 0.0) -> None:
        with self._lock:
            self._rules.append({"text": text, "status": status, "left": times, "delay": delay})

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._hits.clear()

    def hits(self, text: str) -> int:
        with self._lock:
            return self._hits.get(text, 0)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _rule_for(self, path: str) -> dict | None:
        decoded = urllib.parse.unquote(path)
        with self._lock:
            for rule in self._rules:
                if rule["text"] in decoded:
                    self._hits[rule["text"]] = self._hits.get(rule["text"], 0) + 1
                    if rule["left"] is None or rule["left"] > 0:
                        if rule["left"] is not None:
                            rule["left"] -= 1
                        return dict(rule)
        return None

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._rule_for(self.path)
                if rule is not None:
                    if rule["delay"]:
                        time.sleep(rule["delay"])
                    if rule["status"]:
                        payload = json.dumps({"error": {"code": rule["status"], "message": "injected fault",
                                                        "errors": [{"message": "injected fault"}]}}).encode()
                        self.send_response(rule["status"])
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                upstream = http.client.HTTPConnection(proxy._upstream.hostname, proxy._upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        return Handler
