"""The audit trail: one JSON line per act on the archive. Who (calling AE title and address,
or the local user of a command), did what (store, query, retrieve, verify, delete), on what
(UIDs and counts), with what outcome, when.

No PHI: query keys, names and other values never enter a record (a C-FIND records its level
and how many matched). The file is append-only for the node (``O_APPEND`` writes of one line
each); the first node process rotates it by size, the others reopen it when it is rotated,
so every process writes to the current file and no record is lost in a rotation.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import logging.handlers
import os
from pathlib import Path
from typing import Any

__all__ = ["AUDIT_LOGGER", "close_audit", "configure_audit", "local_user", "record"]

AUDIT_LOGGER = "medzip.audit"
_log = logging.getLogger(AUDIT_LOGGER)
_log.propagate = False  # records go to the audit file only, never into the service log
_file: logging.Handler | None = None  # this process's audit file, once configured


class _Line(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


def close_audit() -> None:
    """Stop writing records in this process (until :func:`configure_audit` again)."""
    global _file
    if _file is not None:
        _log.removeHandler(_file)
        _file.close()
        _file = None


def configure_audit(file: Path, max_bytes: int, backups: int, rotates: bool) -> None:
    """Write this process's records to ``file``; ``rotates``: this process rotates it
    (``max_bytes`` a file, ``backups`` kept), else it reopens the file when rotated."""
    close_audit()
    global _file
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler: logging.Handler
    if rotates:
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    else:
        handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
    handler.setFormatter(_Line())
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _file = handler


def local_user() -> str:
    """Who runs a command on this machine (for acts that come from the command line)."""
    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid (a container): the uid says it
        return f"uid {os.getuid()}"


def record(action: str, outcome: str, **details: Any) -> None:
    """Add one record: ``action`` (``"store"``, ``"query"``, ``"retrieve"``, ``"verify"``,
    ``"delete"``...), ``outcome`` (``"success"``, ``"failure"``...), and ``details`` (who:
    ``calling_ae``, ``address`` or ``user``; what: UIDs, counts; never a value)."""
    if _file is None:
        return
    line = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "action": action,
        "outcome": outcome,
        **details,
        "pid": os.getpid(),
    }
    _log.info(json.dumps(line, separators=(",", ":"), default=str))
