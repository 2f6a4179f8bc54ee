"""Dataset builders for the index tests (synthetic data, no PHI)."""

from __future__ import annotations

import hashlib
from typing import Any

from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session

from medzip_scp.index.ingest import StorageFacts, add_instance, attributes_from_dataset
from medzip_scp.index.models import Instance

UID_ROOT = "1.2.826.0.1.3680043.10.1234."


def make_ds(**attrs: Any) -> Dataset:
    """A minimal composite instance; keyword arguments set/override attributes."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.StudyInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.PatientID = "TEST-PID"
    ds.PatientName = "Test^Patient"
    ds.Modality = "CT"
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def storage_kwargs(ds: Dataset, *, ae: str = "TESTSCU") -> dict[str, Any]:
    """Plausible storage facts for ``ds`` (the blob itself does not exist)."""
    digest = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()
    return {
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "blob_key": f"blobs/{digest[:2]}/{digest}",
        "original_size": 1000,
        "original_sha256": digest,
        "stored_size": 400,
        "stored_sha256": digest[::-1],
        "codec_id": "zstd-1",
        "calling_ae_title": ae,
    }


def store(session: Session, ds: Dataset, **overrides: Any) -> Instance:
    """Index ``ds`` (no commit)."""
    kwargs = storage_kwargs(ds)
    kwargs.update(overrides)
    return add_instance(session, attributes_from_dataset(ds), StorageFacts(**kwargs))


def identifier(level: str, **keys: Any) -> Dataset:
    """A C-FIND/C-GET identifier at ``level`` with these keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
