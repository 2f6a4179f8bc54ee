"""Model registry: model id -> weights sha256 (and later class, config, loader).

Version 1 ships no learned model, so every blob with a non-empty model id is rejected with
:class:`~medzip_scp.codec.errors.UnknownModelError` naming the missing weights. Learned paths
will add entries here, pinned by the sha256 of their manifest (``models/<name>/<version>/``);
ids are never reused.
"""

from __future__ import annotations

from dataclasses import dataclass

from medzip_scp.codec.container import ZERO_SHA256, ContainerHeader
from medzip_scp.codec.errors import UnknownModelError

__all__ = ["ModelEntry", "resolve_model"]


@dataclass(frozen=True)
class ModelEntry:
    """A known model: its id and the sha256 digests of its weights and adapters."""

    model_id: str
    model_sha256: bytes
    adapter_sha256: frozenset[bytes] = frozenset({ZERO_SHA256})


_MODELS: dict[str, ModelEntry] = {}


def resolve_model(header: ContainerHeader) -> ModelEntry | None:
    """Return the model a blob needs, or ``None`` for a classical-only blob.

    Raises
    ------
    UnknownModelError
        If the model id is unknown or its recorded weights/adapter hash differs from the
        installed one.
    """
    if not header.model_id and header.model_sha256 == ZERO_SHA256:
        return None
    entry = _MODELS.get(header.model_id)
    if (
        entry is None
        or entry.model_sha256 != header.model_sha256
        or header.adapter_sha256 not in entry.adapter_sha256
    ):
        raise UnknownModelError(
            header.model_id, header.model_sha256.hex(), header.adapter_sha256.hex()
        )
    return entry
