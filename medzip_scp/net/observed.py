"""Every DIMSE service the node answers, counted (:mod:`medzip_scp.metrics`) and audited
(:mod:`medzip_scp.audit`) in one place: :func:`observed` wraps the event handlers, so the
handlers themselves stay about DICOM.

What a record holds: the calling AE title and address, the service, UIDs and counts, the
final status the handler gave. Never a query key or another value: a C-FIND's record says
its level and how many matched.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.multival import MultiValue
from pynetdicom import evt

from medzip_scp import audit, metrics

__all__ = ["observed"]

log = logging.getLogger(__name__)

# event -> (DIMSE service, audit action; "" for none)
_SERVICES: dict[Any, tuple[str, str]] = {
    evt.EVT_C_ECHO: ("C-ECHO", ""),
    evt.EVT_C_STORE: ("C-STORE", "store"),
    evt.EVT_C_FIND: ("C-FIND", "query"),
    evt.EVT_C_GET: ("C-GET", "retrieve"),
    evt.EVT_C_MOVE: ("C-MOVE", "retrieve"),
    evt.EVT_N_ACTION: ("N-ACTION", ""),  # storage commitment audits its own report
}
_PENDING = (0xFF00, 0xFF01)
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def observed(handlers: list[tuple]) -> list[tuple]:
    """``handlers`` (pynetdicom's ``(event, handler[, args])``) with each DIMSE service
    handler counted and audited, and the association outcomes counted."""
    out: list[tuple] = []
    for event, handler, *args in handlers:
        if event in _SERVICES:
            service, action = _SERVICES[event]
            handler = _observe(service, action, handler)
        out.append((event, handler, *args))
    out += [
        (evt.EVT_ESTABLISHED, _association, ["accepted"]),
        (evt.EVT_REJECTED, _association, ["rejected"]),
        (evt.EVT_ABORTED, _association, ["aborted"]),
        (evt.EVT_RELEASED, _association, ["released"]),
    ]
    return out


def _who(event: evt.Event) -> dict[str, Any]:
    requestor = event.assoc.requestor
    return {"calling_ae": str(requestor.ae_title).strip(), "address": requestor.address}


def _association(event: evt.Event, outcome: str) -> None:
    metrics.count_association(outcome)
    if outcome == "rejected":
        audit.record("associate", "rejected", **_who(event))


def _what(event: evt.Event, service: str) -> dict[str, Any]:
    """The request's UIDs (never another value of its identifier)."""
    request = event.request
    if service == "C-STORE":
        return {
            "sop_instance_uid": str(request.AffectedSOPInstanceUID),
            "sop_class_uid": str(request.AffectedSOPClassUID),
        }
    what: dict[str, Any] = {"service": service, "model": str(request.AffectedSOPClassUID)}
    if service == "C-MOVE":
        what["destination"] = str(event.move_destination).strip()
    try:
        identifier = event.identifier
        what["level"] = str(identifier.get("QueryRetrieveLevel", ""))
        if service != "C-FIND":  # a C-FIND's keys may be anything a user typed
            for keyword in _UID_KEYS:
                value = identifier.get(keyword)
                if value:
                    many = isinstance(value, MultiValue)  # a list of UIDs (PS3.4 C.4.2.2.1)
                    what[keyword] = [str(v) for v in value] if many else str(value)
    except Exception:  # undecodable: the handler refuses it; the record says so
        what["identifier"] = "unreadable"
    return what


def _final(status: int) -> str:
    return "success" if status == 0 else f"status 0x{int(status):04X}"


def _observe(service: str, action: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(handler):

        def answers(event: evt.Event, *args: Any) -> Iterator[Any]:
            started = time.monotonic()
            tally = _Tally(service)
            try:
                for item in handler(event, *args):
                    tally.saw(item)
                    yield item
            except Exception:
                tally.status = 0xC000
                raise
            finally:
                metrics.observe_dimse(service, tally.status, time.monotonic() - started)
                if action:
                    details = {**_who(event), **_what(event, service), **tally.details()}
                    audit.record(action, _final(tally.status), **details)

        return answers

    def answer(event: evt.Event, *args: Any) -> Any:
        started = time.monotonic()
        status = 0xC000  # an exception: pynetdicom answers a failure
        try:
            status = handler(event, *args)
            return status
        finally:
            final = status[0] if isinstance(status, tuple) else status  # N-ACTION: (status, reply)
            code = int(final) if isinstance(final, int) else 0
            metrics.observe_dimse(service, code, time.monotonic() - started)
            if action:
                audit.record(action, _final(code), **_who(event), **_what(event, service))

    return answer


class _Tally:
    """What a C-FIND, C-GET or C-MOVE handler yielded: matches or sub-operations, and the
    last status (success when it ended without one: pynetdicom then answers success or,
    for sub-operations that failed, a warning)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.status = 0
        self.matches = 0
        self.sub_operations: int | None = None
        self.refused = False
        self._first = True

    def saw(self, item: Any) -> None:
        first, self._first = self._first, False
        if self.service == "C-MOVE" and first:
            self.refused = isinstance(item, tuple) and item[:1] == (None,)
            if self.refused:
                self.status = 0xA801  # pynetdicom's answer to an unknown destination
            return
        if isinstance(item, int) and self.sub_operations is None and self.service != "C-FIND":
            self.sub_operations = item
            return
        if isinstance(item, tuple) and item and isinstance(item[0], int):
            if item[0] in _PENDING:
                self.matches += 1
            else:
                self.status = int(item[0])

    def details(self) -> dict[str, Any]:
        if self.service == "C-FIND":
            return {"matches": self.matches}
        return {"sub_operations": self.sub_operations or 0}
