"""Exceptions raised by the index layer.

Messages never contain PHI: they may name DICOM keywords, UIDs and rules, but never
patient names, patient IDs, birth dates or accession numbers.
"""

from __future__ import annotations

__all__ = ["DuplicateInstanceError", "IndexError_", "IndexNotEmptyError", "MissingAttributeError"]


class IndexError_(Exception):  # trailing underscore: do not shadow the builtin
    """Base class of every error raised by :mod:`medzip_scp.index`."""


class MissingAttributeError(IndexError_):
    """A dataset lacks an attribute the index needs (absent or zero-length).

    Parameters
    ----------
    keyword : str
        The DICOM keyword of the missing attribute, e.g. ``"SOPInstanceUID"``.
    """

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        super().__init__(f"required attribute {keyword} is absent or empty")


class DuplicateInstanceError(IndexError_):
    """An instance with this SOP Instance UID is already indexed.

    Raised by :func:`medzip_scp.index.ingest.add_instance` when a concurrent
    transaction committed the same SOP Instance UID first.

    Parameters
    ----------
    sop_instance_uid : str
        The SOP Instance UID that is already present.
    """

    def __init__(self, sop_instance_uid: str) -> None:
        self.sop_instance_uid = sop_instance_uid
        super().__init__(f"SOP Instance UID {sop_instance_uid} is already indexed")


class IndexNotEmptyError(IndexError_):
    """The database to rebuild into (``medzip db rebuild``) already holds instances."""
