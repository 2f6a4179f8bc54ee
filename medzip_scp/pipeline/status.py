"""``medzip status``: what an admin checks first. The compression backlog and failures, bytes
received and stored per modality, the keys and models in use, and the last verification.
(A codec that cannot run here already stops the archive from opening, with its reason.)

Counts, sizes, key ids and paths only: no UID, no patient data, no key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from medzip_scp.archive import Archive
from medzip_scp.codec.zoo import MODELS, default_store
from medzip_scp.index.models import InstanceState

__all__ = ["ArchiveStatus", "ModalityTotals", "archive_status"]


@dataclass
class ModalityTotals:
    """The instances of one modality (``""``: none recorded) by state, and their bytes."""

    modality: str
    by_state: dict[str, int] = field(default_factory=dict)
    original_bytes: int = 0
    stored_bytes: int = 0

    @property
    def instances(self) -> int:
        return sum(self.by_state.values())

    @property
    def backlog(self) -> int:
        """Stored as received, waiting for compression."""
        return self.by_state.get(InstanceState.STORED.value, 0)

    @property
    def ratio(self) -> float:
        """Bytes received per byte stored (1.0 for an empty archive)."""
        return self.original_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass
class ArchiveStatus:
    modalities: list[ModalityTotals]
    references: int
    reference_bytes: int
    blob_key_id: str
    blob_key_file: str
    identity_key_file: str
    identity_signing_ids: list[str]
    models: dict[str, bool]  # model id -> installed
    last_verification: dict[str, Any] | None

    @property
    def total(self) -> ModalityTotals:
        total = ModalityTotals("all")
        for row in self.modalities:
            for state, n in row.by_state.items():
                total.by_state[state] = total.by_state.get(state, 0) + n
            total.original_bytes += row.original_bytes
            total.stored_bytes += row.stored_bytes
        total.stored_bytes += self.reference_bytes  # shared by the series' blobs
        return total

    def table(self) -> str:
        states = [s.value for s in InstanceState]
        lines = [
            "| modality | instances | " + " | ".join(states) + " | received bytes "
            "| stored bytes | ratio |",
            "|---|" + "---:|" * (len(states) + 4),
        ]
        for row in [*self.modalities, self.total]:
            counts = " | ".join(str(row.by_state.get(s, 0)) for s in states)
            lines.append(
                f"| {row.modality or '(none)'} | {row.instances} | {counts} "
                f"| {row.original_bytes} | {row.stored_bytes} | {row.ratio:.2f} |"
            )
        lines.append(
            f"series references: {self.references} ({self.reference_bytes} bytes, counted in 'all')"
        )
        lines.append(f"blob key: id {self.blob_key_id} in {self.blob_key_file}")
        if self.identity_signing_ids:
            lines.append(
                f"identity keys: {len(self.identity_signing_ids)} generation(s), signing with "
                f"{self.identity_signing_ids[-1]}, in {self.identity_key_file}"
            )
        else:
            lines.append(f"identity keys: none loaded ({self.identity_key_file})")
        lines.append(
            "models: "
            + ", ".join(f"{m} {'installed' if ok else 'missing'}" for m, ok in self.models.items())
        )
        last = self.last_verification
        if last is None:
            lines.append("last verification: never (run `medzip verify`)")
        else:
            lines.append(
                f"last verification: {last['kind']} finished {last['finished_at']}, "
                f"{last['checked']} checked, {last['not_ok']} not OK"
                + (", interrupted" if last["interrupted"] else "")
            )
        return "\n".join(lines)

    def json(self) -> str:
        def counted(row: ModalityTotals) -> dict[str, Any]:
            return asdict(row) | {"instances": row.instances, "backlog": row.backlog}

        document = asdict(self)
        document["modalities"] = [counted(row) for row in self.modalities]
        document["total"] = counted(self.total)
        return json.dumps(document, indent=1)


def archive_status(archive: Archive) -> ArchiveStatus:
    """The archive's status, read from its index, blob store, keys and models."""
    modalities: dict[str, ModalityTotals] = {}
    for totals in archive.totals():
        row = modalities.setdefault(totals.modality, ModalityTotals(totals.modality))
        row.by_state[totals.state.value] = totals.instances
        row.original_bytes += totals.original_bytes
        row.stored_bytes += totals.stored_bytes
    store = default_store()
    last = archive.last_verification()
    identity = archive.identity
    return ArchiveStatus(
        modalities=list(modalities.values()),
        references=archive.blobs.references.count(),
        reference_bytes=archive.blobs.references.stored_bytes(),
        blob_key_id=archive.blobs.key_id.hex(),
        blob_key_file=str(archive.settings.storage.resolved_key_file()),
        identity_key_file=str(
            archive.settings.identity.resolved_key_file(archive.settings.storage.data_dir)
        ),
        identity_signing_ids=[]
        if identity is None
        else [g.signing_id.hex() for g in identity.generations],
        models={model_id: store.installed(model_id) for model_id in MODELS},
        last_verification=None
        if last is None
        else {
            "kind": last.kind,
            "started_at": last.started_at.isoformat(timespec="seconds"),
            "finished_at": last.finished_at.isoformat(timespec="seconds"),
            "checked": last.checked,
            "not_ok": last.not_ok,
            "interrupted": last.interrupted,
        },
    )
