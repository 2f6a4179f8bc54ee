"""Model registry: model id -> folder, manifest sha256, adapters; and a loader that checks them.

Every learned model the codec has ever written a blob with is listed in :data:`MODELS`, pinned
by the sha256 of its ``models/<name>/<version>/manifest.json`` (which lists the sha256 of the
weights and of every other file) and, per adapter, by the sha256 of the adapter weights. A
blob names the exact model and adapter it needs (:class:`~medzip_scp.codec.container.ModelRef`);
ids are never reused and entries are never removed, so old blobs keep decoding.

A blob that names a model that is not listed, whose hash differs from the listed one, or that
is not installed (folder missing, a file that fails its manifest) raises
:class:`~medzip_scp.codec.errors.UnknownModelError` naming it.

Loading needs ``safetensors``, imported only when a model is actually loaded, so classical
blobs never import it. The integer models (``local-lm-v2``, ``global-vae-v2``) decode with
numpy alone; ``local-lm-v1`` streams need ``torch``, ``transformers`` and ``constriction``,
``global-vae-v1`` streams ``constriction``. A library missing or of an incompatible version raises
:class:`~medzip_scp.codec.errors.IncompatibleLibraryError` naming the library and the versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from medzip_scp import shipped_path
from medzip_scp.codec.container import ZERO_SHA256, ContainerHeader, ModelRef
from medzip_scp.codec.errors import CodecError, UnknownModelError, UnsupportedFormatError

__all__ = [
    "DEFAULT_MODELS_ROOT",
    "DEFAULT_TRAINING_DATA",
    "MODELS",
    "ModelEntry",
    "ModelStore",
    "check_model_folder",
    "default_store",
    "resolve_model",
    "resolve_ref",
]

log = logging.getLogger(__name__)

DEFAULT_MODELS_ROOT = shipped_path("models")
"""Where the shipped models are: the installed package's or the checkout's ``models/``."""

DEFAULT_TRAINING_DATA = shipped_path("models").parents[1] / "shared" / "data"
"""``../shared/data`` beside a checkout: the only data the models are trained and tuned on."""

ModelKind = Literal["local", "global", "prior"]


@dataclass(frozen=True)
class ModelEntry:
    """A released model.

    Attributes
    ----------
    model_id
        Registry id, written into blobs; never reused.
    kind
        ``"local"`` (low planes, :mod:`~medzip_scp.codec.learned.local_path`), ``"global"``
        (high planes, :mod:`~medzip_scp.codec.learned.global_path`) or ``"prior"`` (the model
        small pred frames start from, :mod:`~medzip_scp.codec.predictive.prior`).
    folder
        Folder below the models root (``"local-lm/v1"``).
    manifest_sha256
        Hex sha256 of the folder's ``manifest.json``.
    adapters
        Adapter name -> hex sha256 of its weights (``adapter_model.safetensors``; integer
        models: ``adapter.safetensors``).
    """

    model_id: str
    kind: ModelKind
    folder: str
    manifest_sha256: str
    adapters: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_sha256(self) -> bytes:
        """Raw manifest sha256, as recorded in blobs."""
        return bytes.fromhex(self.manifest_sha256)

    def adapter_name(self, adapter_sha256: bytes) -> str | None:
        """The adapter with this sha256 (``""`` for zeros = no adapter), or ``None``."""
        if adapter_sha256 == ZERO_SHA256:
            return ""
        for name, sha in self.adapters.items():
            if bytes.fromhex(sha) == adapter_sha256:
                return name
        return None

    def ref(self, adapter: str = "") -> ModelRef:
        """The :class:`ModelRef` a blob records for this model (and adapter)."""
        if adapter and adapter not in self.adapters:
            raise UnknownModelError(
                self.model_id,
                self.manifest_sha256,
                ZERO_SHA256.hex(),
                f"has no released adapter {adapter!r}",
            )
        asha = bytes.fromhex(self.adapters[adapter]) if adapter else ZERO_SHA256
        return ModelRef(self.model_id, self.model_sha256, asha)


# Append only. Never change or remove an entry: blobs in archives name these hashes.
MODELS: Mapping[str, ModelEntry] = MappingProxyType(
    {
        "local-lm-v1": ModelEntry(
            "local-lm-v1",
            "local",
            "local-lm/v1",
            "da280dcb29bd0cb704057f05715e110b2d47866ead21f1f4716843f75e4a80b0",
            MappingProxyType(
                {
                    "ct": "0d5aff5f161b074c0dbde6d9a73ad214ed11af84b68b4835f225261cfe498633",
                    "mr": "1aa0fe369437ca6f4ed0a8c83602eba4aa989d9a320a10167f35b74291736bce",
                }
            ),
        ),
        "local-lm-v2": ModelEntry(
            "local-lm-v2",
            "local",
            "local-lm/v2",
            "c10e0d8d590d4e0835a3d487a52a6894804bdb1c7c0cca197326dc41113012eb",
            MappingProxyType(
                {
                    "ct": "57c851fa2596a6d83bd690307a00a11a44191a15f881a921425dd0de5dc6207d",
                    "mr": "131b2ba74df8d211a01d2ddaf84ba22ae798ab455fffc9a5d0d4a64617834add",
                }
            ),
        ),
        "global-vae-v1": ModelEntry(
            "global-vae-v1",
            "global",
            "global-vae/v1",
            "e5415c2c6fb2dee2f096cb748d56c285d643c7a59e1c0d94130b5430c267f9d6",
        ),
        "global-vae-v2": ModelEntry(
            "global-vae-v2",
            "global",
            "global-vae/v2",
            "d1d62e28a55dbf2b1518a99b6db1b5f154e9f2316ece1346d1bc83a0f07637e9",
        ),
        "pred-prior-v1": ModelEntry(
            "pred-prior-v1",
            "prior",
            "pred-prior/v1",
            "42fbbcdcdf44fd4e688634f5b4839fab4a097afd3dca2f7e83013ed2b9cdd88b",
        ),
    }
)


def resolve_ref(ref: ModelRef, models: Mapping[str, ModelEntry] = MODELS) -> ModelEntry:
    """Return the registry entry of ``ref``.

    Raises
    ------
    UnknownModelError
        If the id is not registered, or its manifest or adapter sha256 differs from the
        registered one.
    """
    entry = models.get(ref.model_id)
    if entry is None:
        reason = "is not registered in this release (written by a newer medzip?)"
    elif entry.model_sha256 != ref.model_sha256:
        reason = f"differs from the registered one (manifest sha256 {entry.manifest_sha256})"
    elif entry.adapter_name(ref.adapter_sha256) is None:
        reason = "names an adapter that is not registered"
    else:
        return entry
    raise UnknownModelError(ref.model_id, ref.model_sha256.hex(), ref.adapter_sha256.hex(), reason)


def resolve_model(header: ContainerHeader) -> list[ModelEntry]:
    """Registry entries of every model a blob's header names (empty for a classical blob).

    Raises
    ------
    UnknownModelError
        As :func:`resolve_ref`, for the first model that does not resolve.
    """
    return [resolve_ref(ref) for ref in header.model_refs()]


def check_model_folder(
    model_id: str, folder: Path, required: Sequence[str] = ()
) -> tuple[Mapping[str, str], bytes]:
    """The one check of a model folder, before a loader reads anything in it: its
    ``manifest.json`` against the registry's pin (for a registered id), then every file the
    manifest lists against its sha256.

    Parameters
    ----------
    model_id
        The model's id (``"local-lm-v2"``); an unregistered id (a model being trained) has
        no pin.
    folder
        The model's folder.
    required
        Files the loader needs, which the manifest must list.

    Returns
    -------
    files, manifest_sha256
        The manifest's file -> hex sha256 table, and the manifest's raw sha256.

    Raises
    ------
    UnknownModelError
        Naming what failed: no manifest, another manifest than the pinned one, a required file
        not listed, a file missing or differing from its sha256.
    """
    entry = MODELS.get(model_id)
    pinned = entry.manifest_sha256 if entry is not None else "unknown"
    no_adapter = ZERO_SHA256.hex()
    manifest_path = folder / "manifest.json"
    try:
        raw = manifest_path.read_bytes()
        files: Mapping[str, str] = json.loads(raw)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UnknownModelError(
            model_id, pinned, no_adapter, f"is not installed: no valid manifest at {manifest_path}"
        ) from None
    digest = hashlib.sha256(raw)
    if entry is not None and digest.hexdigest() != pinned:
        raise UnknownModelError(
            model_id,
            pinned,
            no_adapter,
            f"is installed in {folder} with another manifest (sha256 {digest.hexdigest()})",
        )
    for name in required:
        if name not in files:
            sha = digest.hexdigest()
            raise UnknownModelError(
                model_id, sha, no_adapter, f"manifest {manifest_path} lists no {name}"
            )
    for rel, want in files.items():
        path = folder / rel
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != want:
            raise UnknownModelError(
                model_id,
                digest.hexdigest(),
                no_adapter,
                f"fails its manifest in {folder}: file {rel}: expected sha256 {want}, got {got}",
            )
    return files, digest.digest()


class ModelStore:
    """Loads registered models from a models folder, checking their hashes; caches them.

    Parameters
    ----------
    root
        The models folder (default :data:`DEFAULT_MODELS_ROOT`).
    models
        The registry (default :data:`MODELS`; tests may pass a smaller one).

    Notes
    -----
    Thread-safe; loaded models are immutable and shared.
    """

    def __init__(self, root: Path | None = None, models: Mapping[str, ModelEntry] = MODELS) -> None:
        self.root = Path(root) if root is not None else DEFAULT_MODELS_ROOT
        self.models = models
        self._cache: dict[ModelRef, Any] = {}
        self._lock = threading.Lock()

    def entry(self, model_id: str) -> ModelEntry:
        """The registry entry of ``model_id``.

        Raises
        ------
        UnknownModelError
            If ``model_id`` is not registered.
        """
        entry = self.models.get(model_id)
        if entry is None:
            raise UnknownModelError(model_id, "unknown", ZERO_SHA256.hex(), "is not registered")
        return entry

    def installed(self, model_id: str) -> bool:
        """Whether ``model_id`` is registered and its manifest is present with the pinned hash."""
        entry = self.models.get(model_id)
        if entry is None:
            return False
        man = self.root / entry.folder / "manifest.json"
        try:
            return hashlib.sha256(man.read_bytes()).hexdigest() == entry.manifest_sha256
        except OSError:
            return False

    def load(self, ref: ModelRef) -> Any:
        """Load the exact model ``ref`` names (``LocalModel``, ``GlobalModel`` or ``PredPrior``).

        Raises
        ------
        UnknownModelError
            If the model is not registered, its hashes differ, or it is not installed (a file
            is missing or fails its manifest).
        """
        entry = resolve_ref(ref, self.models)
        with self._lock:
            cached = self._cache.get(ref)
            if cached is not None:
                return cached
            model = self._load(entry, ref)
            self._cache[ref] = model
            return model

    def _load(self, entry: ModelEntry, ref: ModelRef) -> Any:
        folder = self.root / entry.folder
        sha_hex, asha_hex = ref.model_sha256.hex(), ref.adapter_sha256.hex()
        if not self.installed(entry.model_id):
            raise UnknownModelError(
                entry.model_id,
                sha_hex,
                asha_hex,
                f"is not installed in {self.root} ({entry.folder}/manifest.json missing or "
                "not the released one)",
            )
        adapter = entry.adapter_name(ref.adapter_sha256) or ""
        try:
            if entry.kind == "prior":
                from medzip_scp.codec.predictive.prior import PRIOR_FILE, read_prior

                check_model_folder(entry.model_id, folder, (PRIOR_FILE,))
                return read_prior(folder / PRIOR_FILE)
            if entry.kind == "local":
                from medzip_scp.codec.learned import local_path

                version = entry.folder.rsplit("/", 1)[1]
                model = local_path.load_model(
                    f"local-lm-{version}", adapter=adapter or None, root=self.root
                )
                if model.sha256 != ref.model_sha256 or model.adapter_sha256 != ref.adapter_sha256:
                    raise UnknownModelError(
                        entry.model_id, sha_hex, asha_hex, "loaded with other hashes"
                    )
                return model
            from medzip_scp.codec.learned.global_path.model import load_model_dir

            return load_model_dir(entry.model_id, folder)
        except (UnknownModelError, UnsupportedFormatError):
            raise  # incl. IncompatibleLibraryError: names the library to install
        except (CodecError, OSError, KeyError, ValueError) as exc:
            log.warning("model %s failed to load: %s", entry.model_id, type(exc).__name__)
            raise UnknownModelError(
                entry.model_id, sha_hex, asha_hex, f"failed to load ({type(exc).__name__})"
            ) from exc


_DEFAULT: ModelStore | None = None
_DEFAULT_LOCK = threading.Lock()


def default_store() -> ModelStore:
    """The process-wide store over :data:`DEFAULT_MODELS_ROOT`, or the folder given to
    :func:`use_models_folder` (created on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = ModelStore()
        return _DEFAULT


def use_models_folder(root: Path) -> None:
    """Load models from ``root`` from now on in this process (``medzip codec --models``,
    ``[pipeline] models_dir``).

    Raises
    ------
    ValueError
        If ``root`` is not a folder (one line naming it).
    """
    global _DEFAULT
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"models folder {root} does not exist: give the folder that holds the shipped "
            "models (local-lm/, global-vae/; the repository's models/)"
        )
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT.root != root:
            _DEFAULT = ModelStore(root=root)
