"""Example API for deploy/docker-compose.yml: requests logged in the forwarder's schema.

Stands in for the real FastAPI app (which calls the same `setup_logging("api")` at
start-up). Every line is one JSON object on stdout, written by
`forwarder.producers.logging` (the image ships the package); an error comes with its
traceback in meta.traceback, in the same line.

    GET  /health         200: the container's healthcheck
    GET  /orders/<n>     200, one INFO line (event "order.read")
    GET  /boom           500, one ERROR line: five within 60 s fire api_error_burst
    POST /control/stop   what the redis_down alarm calls (notifiers.api_stop): needs
                         "Authorization: Bearer $API_CONTROL_TOKEN"; 202, one WARNING line

Environment: EXAMPLE_PORT (default 8000), API_CONTROL_TOKEN.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from forwarder.producers.logging import setup_logging, trace_context

log = logging.getLogger("api")


class Handler(BaseHTTPRequestHandler):
    server_version = "example-api"
    stopped = False

    def do_GET(self) -> None:
        with trace_context(self.headers.get("x-request-id")):
            if self.path == "/health":
                self._reply(200, {"status": "stopped" if Handler.stopped else "ok"})
            elif self.path.startswith("/orders/"):
                order_id = self.path.removeprefix("/orders/")
                log.info("order read", extra={"event": "order.read", "order_id": order_id})
                self._reply(200, {"order_id": order_id})
            elif self.path == "/boom":
                try:
                    {}["missing"]  # the example's bug
                except KeyError:
                    log.exception("unhandled error", extra={"event": "http.error"})
                self._reply(500, {"error": "internal"})
            else:
                self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        with trace_context(self.headers.get("x-request-id")):
            if self.path != "/control/stop":
                self._reply(404, {"error": "not found"})
                return
            token = os.environ.get("API_CONTROL_TOKEN", "")
            given = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if not token or not hmac.compare_digest(given.encode(), token.encode()):
                log.warning("control/stop refused", extra={"event": "control.refused"})
                self._reply(401, {"error": "unauthorized"})
                return
            Handler.stopped = True
            log.warning("stop requested by the forwarder", extra={"event": "control.stop"})
            self._reply(202, {"stopped": True})

    def _reply(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.path != "/health":  # the healthcheck would be most of the log
            log.info(
                "%s %s %s",
                self.command,
                self.path,
                code,
                extra={"event": "http.access", "status_code": int(code) if code != "-" else 0},
            )

    def log_message(self, format: str, *args: object) -> None:
        log.warning(format, *args, extra={"event": "http.server"})


def main() -> int:
    setup_logging("api")
    port = int(os.environ.get("EXAMPLE_PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    log.info("listening on port %d", server.server_address[1], extra={"event": "startup"})
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
