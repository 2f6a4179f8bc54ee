"""A real Orthanc (Debian's ``orthanc``) for the interoperability tests: its own config,
storage and ports in a temporary folder, driven through its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ORTHANC = Path("/usr/sbin/Orthanc")


class Orthanc:
    """One running Orthanc: ``rest(method, path, body)`` and the DICOM side's AE/port."""

    ae_title = "ORTHANC"

    def __init__(self, http_port: int, dicom_port: int) -> None:
        self.http_port = http_port
        self.dicom_port = dicom_port

    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()
            raise AssertionError(f"Orthanc {method} {path}: HTTP {exc.code} {detail!r}") from None
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload

    def upload(self, path: Path) -> str:
        """Store a file in Orthanc; returns its Orthanc instance id."""
        return str(self.rest("POST", "/instances", raw=path.read_bytes())["ID"])

    def instance_by_uid(self, sop_instance_uid: str) -> str | None:
        found = self.rest("POST", "/tools/lookup", raw=sop_instance_uid.encode())
        ids = [f["ID"] for f in found if f["Type"] == "Instance"]
        return ids[0] if ids else None

    def delete_all(self) -> None:
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")

    def query(self, modality: str, level: str, keys: dict[str, str]) -> list[dict[str, Any]]:
        """C-FIND from Orthanc to ``modality``; each answer as {keyword: value}."""
        started = self.rest(
            "POST", f"/modalities/{modality}/query", {"Level": level, "Query": keys}
        )
        answers = self.rest("GET", f"/queries/{started['ID']}/answers?expand&simplify")
        return list(answers)


@contextmanager
def running_orthanc(
    work: Path,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, tuple[str, str, int]],
    **options: Any,
) -> Iterator[Orthanc]:
    """Start Orthanc with ``modalities`` ({name: (AE title, host, port)}), stock timeouts
    and ``options`` (more configuration keys, e.g. ``DefaultEncoding="Utf8"``)."""
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medzip-test",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": Orthanc.ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
    } | options
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("w")
    proc = subprocess.Popen(
        [str(ORTHANC), str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    orthanc = Orthanc(http_port, dicom_port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                orthanc.rest("GET", "/system")
                break
            except (OSError, AssertionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "Orthanc did not start:\n" + (work / "orthanc.log").read_text()
                    ) from None
                time.sleep(0.2)
        yield orthanc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def orthanc_available() -> bool:
    return ORTHANC.is_file() and shutil.which(str(ORTHANC)) is not None
