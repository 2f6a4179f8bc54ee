"""The node's HTTP monitoring port (``[monitoring] port``), served by its first process:

- ``/metrics``: Prometheus text format, every node process's counters added up
  (:mod:`medzip_scp.metrics`) and the archive's totals read from the index at scrape time;
- ``/healthz``: 200 while the process answers (liveness);
- ``/readyz``: 200 once the node serves and its index and blob store answer, else 503 with
  the reasons (readiness).

Read-only, no PHI: counts, sizes and states.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from medzip_scp import metrics
from medzip_scp.archive import Archive

__all__ = ["MonitoringServer", "start_monitoring"]

log = logging.getLogger(__name__)


class _ArchiveCollector:
    """The index's totals, read when scraped (a gauge per modality and state)."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        instances = GaugeMetricFamily(
            "medzip_instances", "Instances in the archive.", labels=["modality", "state"]
        )
        stored = GaugeMetricFamily(
            "medzip_archive_bytes",
            "Bytes of the archived instances, as received and as stored.",
            labels=["kind"],
        )
        received_total = stored_total = 0
        for row in self._archive.totals():
            instances.add_metric([row.modality, row.state.value], row.instances)
            received_total += row.original_bytes
            stored_total += row.stored_bytes
        stored.add_metric(["received"], received_total)
        stored.add_metric(["stored"], stored_total + self._archive.blobs.references.stored_bytes())
        yield instances
        yield stored
        last = self._archive.last_verification()
        if last is not None:
            yield GaugeMetricFamily(
                "medzip_last_verification_timestamp_seconds",
                "When the last verification pass ended.",
                value=last.finished_at.timestamp(),
            )
            yield GaugeMetricFamily(
                "medzip_last_verification_not_ok",
                "Instances the last verification pass found not OK.",
                value=last.not_ok,
            )


class MonitoringServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], archive: Archive) -> None:
        super().__init__(address, _Handler)
        self.archive = archive
        self.serving = threading.Event()  # set once the node says "ready"
        self.collector = _ArchiveCollector(archive)


class _Handler(BaseHTTPRequestHandler):
    server: MonitoringServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._answer(200, b"ok\n")
        elif path == "/readyz":
            problems = [] if self.server.serving.is_set() else ["the node is starting"]
            problems += self.server.archive.health_problems()
            if problems:
                self._answer(503, ("not ready: " + "; ".join(problems) + "\n").encode())
            else:
                self._answer(200, b"ready\n")
        elif path == "/metrics":
            try:
                body, content_type = metrics.scrape(self.server.collector)
            except Exception as exc:  # the index is away, say: the scrape says so
                log.error("metrics scrape failed: %s", type(exc).__name__)
                self._answer(500, f"scrape failed: {type(exc).__name__}\n".encode())
                return
            self._answer(200, body, content_type)
        else:
            self._answer(404, b"not found: /metrics, /healthz or /readyz\n")

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("monitoring %s: " + format, self.client_address[0], *args)


def start_monitoring(archive: Archive) -> MonitoringServer | None:
    """Serve the monitoring port in a thread; None when ``[monitoring] port`` is not set.

    Raises
    ------
    OSError
        If the port cannot be bound.
    """
    settings = archive.settings.monitoring
    if settings.port is None:
        return None
    server = MonitoringServer((settings.bind, settings.port), archive)
    threading.Thread(target=server.serve_forever, name="medzip-monitoring", daemon=True).start()
    return server
