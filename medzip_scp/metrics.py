"""The node's Prometheus metrics: off (every call a no-op) until :func:`enable` is called,
which the node does when ``[monitoring] port`` is set.

The node runs several processes; each writes its counters to files in one folder (the
client's multiprocess mode), and the first process's ``/metrics`` adds them up. The folder is
named by ``PROMETHEUS_MULTIPROC_DIR``, which must be set before ``prometheus_client`` is first
imported in a process: this module imports it only in :func:`enable`, the first process sets
the variable (and empties the folder) before it starts the others, and they inherit it.

Labels are service names, outcomes and operations: never an AE title, UID or value.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MULTIPROCESS_VARIABLE",
    "count_association",
    "count_verification",
    "enable",
    "enabled",
    "observe_codec",
    "observe_dimse",
    "prepare_folder",
    "scrape",
]

MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class _Metrics:
    associations: Any
    requests: Any
    request_seconds: Any
    codec_seconds: Any
    codec_bytes: Any
    verification_failures: Any


_metrics: _Metrics | None = None


def prepare_folder(folder: Path) -> None:
    """Empty ``folder`` and name it for this process and the processes it starts (before
    any of them counts anything)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROCESS_VARIABLE] = str(folder)


def enable() -> None:
    """Start counting in this process, into the folder :func:`prepare_folder` named."""
    global _metrics
    if _metrics is not None:
        return
    if not os.environ.get(MULTIPROCESS_VARIABLE):
        raise RuntimeError(f"metrics need {MULTIPROCESS_VARIABLE}: call prepare_folder first")
    from prometheus_client import Counter, Histogram

    _metrics = _Metrics(
        associations=Counter("medzip_associations", "Associations by outcome.", ["outcome"]),
        requests=Counter(
            "medzip_dimse_requests",
            "DIMSE requests answered, by service and outcome of the final status.",
            ["service", "outcome"],
        ),
        request_seconds=Histogram(
            "medzip_dimse_request_seconds",
            "Seconds from a DIMSE request to its final response, by service.",
            ["service"],
            buckets=_LATENCY_BUCKETS,
        ),
        codec_seconds=Counter(
            "medzip_codec_seconds", "CPU-bound codec work, wall seconds, by operation.", ["op"]
        ),
        codec_bytes=Counter(
            "medzip_compression_bytes",
            "Bytes of the instances compressed: as received and as stored.",
            ["kind"],
        ),
        verification_failures=Counter(
            "medzip_verification_failures", "Instances a verification pass found not OK."
        ),
    )


def enabled() -> bool:
    return _metrics is not None


def _outcome(status: int) -> str:
    """A DIMSE status in words (PS3.7 C): success, pending, cancel, warning or failure."""
    if status == 0x0000:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def observe_dimse(service: str, status: int, seconds: float) -> None:
    """A DIMSE request of ``service`` (``"C-STORE"``...) answered with ``status``."""
    if _metrics is None:
        return
    _metrics.requests.labels(service, _outcome(status)).inc()
    _metrics.request_seconds.labels(service).observe(seconds)


def count_association(outcome: str) -> None:
    """An association ``"accepted"``, ``"rejected"``, ``"released"`` or ``"aborted"``."""
    if _metrics is not None:
        _metrics.associations.labels(outcome).inc()


def observe_codec(op: str, seconds: float, original_bytes: int = 0, stored_bytes: int = 0) -> None:
    """Codec work: ``op`` ``"encode"`` (with the sizes before and after) or ``"decode"``."""
    if _metrics is None:
        return
    _metrics.codec_seconds.labels(op).inc(seconds)
    if original_bytes:
        _metrics.codec_bytes.labels("original").inc(original_bytes)
        _metrics.codec_bytes.labels("stored").inc(stored_bytes)


def count_verification(not_ok: int) -> None:
    if _metrics is not None and not_ok:
        _metrics.verification_failures.inc(not_ok)


def scrape(*collectors: object) -> tuple[bytes, str]:
    """Every process's metrics added up, and ``collectors``' (read at scrape time): the
    body and content type of a ``/metrics`` answer."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
