"""A loopback proxy in front of a real S3 server that refuses the first N matching requests with
503 Service Unavailable: a transient outage that is deterministic, so a test can tell exactly
which layer (the S3 client's own retries, or Prefect's task retries) rode it out."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

OUTAGE = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
          b"<Message>injected outage</Message><RequestId>flaky-s3</RequestId></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FlakyS3:
    """Forward every request to ``upstream``; answer 503 to the first ``failures`` requests whose
    method is ``method`` and whose path contains ``path_part``."""

    def __init__(self, upstream: str, method: str, path_part: str, failures: int) -> None:
        self.upstream = urlsplit(upstream)
        self.method, self.path_part, self.failures = method, path_part, failures
        self.refused: list[str] = []
        self.passed: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyS3:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _refuse(self, method: str, path: str) -> bool:
        with self.lock:
            if (method == self.method and self.path_part in path
                    and len(self.refused) < self.failures):
                self.refused.append(path)
                return True
            if method == self.method and self.path_part in path:
                self.passed.append(path)
            return False

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        raw += self.rfile.read(size + 2)
                        if size == 0:
                            return raw
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                # HEAD answers carry the object's length but no body: pass that length on.
                length = dict((k.lower(), v) for k, v in headers).get("content-length")
                head = self.command == "HEAD" and length is not None
                self.send_header("Content-Length", length if head else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                if proxy._refuse(self.command, self.path):
                    self._reply(503, [("Content-Type", "application/xml")], OUTAGE)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True,
                                    skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        conn.putheader(name, value)
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    self._reply(resp.status, resp.getheaders(), resp.read())
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
