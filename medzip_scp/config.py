"""Node configuration: the only reader of configuration files and the environment.

Precedence, lowest first: built-in defaults (the embedded quick-start node), the TOML file
given to ``medzip serve --config``, ``MEDZIP_*`` environment variables (nested fields with
``__``, e.g. ``MEDZIP_NODE__PORT=104``), then command-line flags.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydicom.charset import python_encoding


class Right(StrEnum):
    """What a calling AE may ask of the node (one per DIMSE service)."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    GET = "get"
    MOVE = "move"


ALL_RIGHTS = frozenset(Right)


class DuplicatePolicyValues(StrEnum):
    """What a C-STORE of an already stored SOP Instance UID with *different* content does.

    Identical content is always an idempotent success.
    """

    REJECT = "reject"  # refuse with 0x0111 (Duplicate SOP Instance); the sender keeps its copy
    REPLACE = "replace"  # store the new copy; the old one stays as a superseded version


class ConfigError(ValueError):
    """A configuration the node cannot use; the message is one line for the user."""


class _Section(BaseModel):
    """A table of the configuration file: a key it does not know is a mistake (a typo
    would otherwise leave the default in force without a word)."""

    model_config = ConfigDict(extra="forbid")


def check_ae_title(value: str) -> str:
    """PS3.5 AE VR: 1-16 characters, no backslash; surrounding spaces are not significant."""
    value = value.strip()
    if not 1 <= len(value) <= 16 or "\\" in value:
        raise ValueError(f"AE title must be 1-16 characters without '\\', got {value!r}")
    return value


def default_processes() -> int:
    """One node process per CPU core (at most 8) on Linux, one elsewhere (the first process
    passes associations to the others over ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pairs).
    Python runs one thread at a time per process, so concurrent associations need
    processes to use cores: on 2 cores, 4 associations of CT slices went from 85 to 140
    instances/s."""
    if not sys.platform.startswith("linux"):
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0))))


class NodeSettings(_Section):
    ae_title: str = Field("MEDZIP", description="Called AE title of this node (1-16 chars).")
    bind: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(11112, ge=1, le=65535, description="DICOM port.")
    max_pdu: int = Field(
        262144,
        ge=0,
        description="Maximum PDU length we accept (our Maximum Length sub-item): a longer "
        "P-DATA-TF aborts the association (0: unlimited, and unbounded memory per PDU).",
    )
    max_associations: int = Field(32, ge=1, description="Concurrent associations.")
    max_associations_per_address: int = Field(
        16,
        ge=1,
        description="Open connections from one remote address (associations and connections "
        "that have not sent their A-ASSOCIATE-RQ yet); more are closed at once. With several "
        "processes each takes its share, as for max_associations.",
    )
    processes: int = Field(
        default_factory=default_processes,
        ge=1,
        le=64,
        description="Node processes (Linux); the first accepts associations and deals them "
        "round-robin to all, so concurrent associations use more than one CPU core. "
        "Default: one per core (at most 8) on Linux, 1 elsewhere.",
    )
    network_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds without network traffic; also the longest a peer may stall in "
        "the middle of a PDU, or leave a PDU of ours unread, before it is dropped.",
    )
    association_request_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a new connection has to send its whole A-ASSOCIATE-RQ (the "
        "ARTIM timer) before it is closed; also the wait for a C-MOVE destination's answer "
        "to our association request.",
    )
    dimse_timeout: float = Field(60.0, description="Seconds to wait for a DIMSE message.")

    _check_aet = field_validator("ae_title")(lambda cls, v: check_ae_title(v))


class StorageSettings(_Section):
    data_dir: Path = Field(Path("medzip-data"), description="Holds database, blobs, keys.")
    database_url: str = Field("", description="SQLAlchemy URL; empty: SQLite in data_dir.")
    blob_dir: Path | None = Field(None, description="Blob folder; empty: data_dir/blobs.")
    key_file: Path | None = Field(None, description="Blob encryption key; data_dir/keys.")
    duplicate_policy: DuplicatePolicyValues = DuplicatePolicyValues.REJECT
    allow_delete: bool = Field(
        False, description="Allow `medzip studies delete` (audited; off: studies are kept)."
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()

    def resolved_key_file(self) -> Path:
        return (self.key_file or self.data_dir / "keys" / "blob.key").resolve()

    def incoming_dir(self) -> Path:
        """Where associations spool received datasets before they are stored."""
        return (self.data_dir / "incoming").resolve()


class PeerAE(_Section):
    """A calling AE on the allow-list."""

    ae_title: str
    _check_aet = field_validator("ae_title")(lambda cls, v: check_ae_title(v))
    hosts: list[str] = Field(default_factory=list, description="Empty: any host.")
    rights: set[Right] = Field(default_factory=lambda: set(ALL_RIGHTS))


class AccessSettings(_Section):
    check_called_ae: bool = Field(True, description="Reject associations not called MEDZIP.")
    allow_unknown_ae: bool = Field(
        True, description="Accept calling AEs not on the allow-list (from unknown_ae_hosts)."
    )
    unknown_ae_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Networks unknown AEs may call from.",
    )
    unknown_ae_rights: set[Right] = Field(default_factory=lambda: set(ALL_RIGHTS))
    peers: list[PeerAE] = Field(default_factory=list)

    @field_validator("unknown_ae_hosts")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value


class MoveDestination(_Section):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _check_aet = field_validator("ae_title")(lambda cls, v: check_ae_title(v))


class RetrieveSettings(_Section):
    get_without_role_selection: bool = Field(
        True,
        description="Send C-GET sub-operations on storage contexts the peer proposed without "
        "SCP/SCU role selection (Horos/OsiriX behaviour).",
    )
    destinations: list[MoveDestination] = Field(default_factory=list)


class QuerySettings(_Section):
    max_answers: int = Field(
        10000,
        ge=1,
        description="Most C-FIND matches answered; past it the query ends with 0xA700 "
        "(Refused: Out of Resources) after the first max_answers responses.",
    )
    character_set: str = Field(
        "ISO_IR 192",
        description="Specific Character Set of C-FIND responses to queries that name none "
        "(values it cannot encode go out in ISO_IR 192, UTF-8).",
    )

    @field_validator("character_set")
    @classmethod
    def _check_character_set(cls, value: str) -> str:
        terms = [term.strip() for term in value.split("\\")]
        unknown = [t for n, t in enumerate(terms) if t not in python_encoding or not t and n]
        if unknown or not any(terms):
            raise ValueError(
                f"[query] character_set must be a DICOM Specific Character Set such as "
                f"'ISO_IR 192' or 'ISO_IR 100', got {value!r}"
            )
        return "\\".join(terms)


class PipelineSettings(_Section):
    learned: bool = Field(
        False,
        description="Also try the learned split paths when compressing (under 2 % smaller "
        "on MR/EPI at 30-200x the decode time); blobs of either kind decode.",
    )
    compress: bool = Field(
        True,
        description="Compress acknowledged originals in the background while serving "
        "(each blob replaces its original only after a bit-exact decode).",
    )
    poll_seconds: float = Field(2.0, gt=0, description="Idle wait between compression passes.")
    series_quiet_seconds: float = Field(
        0.0,
        ge=0,
        description="Compress a series only once none of its instances arrived for this "
        "long (0: at once), so that it is coded as a whole, against one reference of its own.",
    )
    models_dir: Path | None = Field(
        None,
        description="Folder of the codec's models, the learned paths' and the predictive "
        "prior (default: the installation's models/); blobs name the exact model they need.",
    )

    @field_validator("models_dir")
    @classmethod
    def _models_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_dir():
            raise ValueError(f"models folder {value} does not exist")
        return value


class IdentitySettings(_Section):
    """The patient's identity sealed inside each compressed blob (medzip_scp.identity)."""

    key_file: Path | None = Field(
        None,
        description="Identity keys (master + signing keys, every generation); "
        "data_dir/keys/identity.json. Keep it, and its backup, outside the data folder.",
    )
    extra_attributes: list[str] = Field(
        default_factory=list,
        description="Keywords sealed into the payload besides PS3.15's basic profile ones.",
    )
    private_elements: bool = Field(
        False, description="Also seal every private element (vendors may keep names there)."
    )
    check_on_retrieve: bool = Field(
        False,
        description="On every retrieval also compare the index row's patient and study with "
        "this instance's sealed identity and refuse to send it when they differ. Strict: a "
        "study whose later instances changed its patient attributes (a corrected name) is "
        "then refused too; `medzip verify` and the sweep allow what another instance of the "
        "study gave.",
    )
    sweep_hours: float = Field(
        0.0,
        ge=0,
        description="Hours between the node's verification sweeps over every instance "
        "(0: no sweep; `medzip verify` checks on demand).",
    )

    def resolved_key_file(self, data_dir: Path) -> Path:
        return (self.key_file or data_dir / "keys" / "identity.json").resolve()

    @field_validator("extra_attributes")
    @classmethod
    def _known_keywords(cls, keywords: list[str]) -> list[str]:
        from pydicom.datadict import tag_for_keyword

        unknown = [k for k in keywords if tag_for_keyword(k) is None]
        if unknown:
            raise ValueError(f"not DICOM keywords: {', '.join(unknown)}")
        return keywords


class MonitoringSettings(_Section):
    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="HTTP port of /metrics (Prometheus), /healthz and /readyz; none: off.",
    )
    bind: str = Field(
        "127.0.0.1", description="Address of the monitoring port (0.0.0.0 in a container)."
    )


class AuditSettings(_Section):
    enabled: bool = Field(True, description="Keep the audit trail (JSON lines, no PHI).")
    file: Path | None = Field(None, description="Audit file; default data_dir/audit/audit.jsonl.")
    max_bytes: int = Field(10 << 20, ge=4096, description="Rotate the file at this size.")
    backups: int = Field(10, ge=1, description="Rotated files kept (audit.jsonl.1 ...).")

    def resolved_file(self, data_dir: Path) -> Path:
        return (self.file or data_dir / "audit" / "audit.jsonl").resolve()


class TLSSettings(_Section):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False
    private_key_password: SecretStr | None = None


class Settings(BaseSettings):
    """The whole node configuration."""

    model_config = SettingsConfigDict(env_prefix="MEDZIP_", env_nested_delimiter="__")

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    retrieve: RetrieveSettings = Field(default_factory=RetrieveSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init kwargs); flags are applied afterwards.
        return env_settings, init_settings

    def move_destination(self, ae_title: str) -> MoveDestination | None:
        for dest in self.retrieve.destinations:
            if dest.ae_title == ae_title.strip():
                return dest
        return None


ENV_PREFIX = "MEDZIP_"
DEBUG_VARIABLE = "MEDZIP_DEBUG"
# MEDZIP_ variables that are not node settings: read by the CLI, the tests and the benchmarks.
OTHER_VARIABLES = frozenset(
    {
        DEBUG_VARIABLE,
        "MEDZIP_TEST_PG_URL",
        "MEDZIP_REQUIRE_PG",
        "MEDZIP_BENCH_PG_URL",
    }
)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def setting_variables() -> dict[str, tuple[str, ...]]:
    """Every ``MEDZIP_*`` variable the settings read, with the setting it sets (a section
    alone is a JSON table, e.g. ``MEDZIP_NODE='{"port": 104}'``)."""
    names: dict[str, tuple[str, ...]] = {}
    for name, field in Settings.model_fields.items():
        names[f"{ENV_PREFIX}{name}".upper()] = (name,)
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
            for key in field.annotation.model_fields:
                names[f"{ENV_PREFIX}{name}__{key}".upper()] = (name, key)
    return names


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    known = setting_variables()
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"did you mean {close[0]}?" if close else "see `medzip config example`"
        raise ConfigError(
            f"unknown setting in environment variable {variable} (settings are "
            f"MEDZIP_<SECTION>__<KEY>, e.g. MEDZIP_NODE__PORT); {hint}"
        )


def _key_name(loc: tuple[int | str, ...]) -> str:
    """A location in the settings as the TOML file writes it: ``[node] port``."""
    if len(loc) == 1:
        return str(loc[0])
    rest = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
    return f"[{loc[0]}] {rest.lstrip('.')}"


def _describe_invalid(
    exc: ValidationError, config_file: Path | None, environ: Mapping[str, str]
) -> str:
    """The first error of ``exc`` as one line naming the key and where it was set."""
    errors = exc.errors()
    error = errors[0]
    loc = tuple(error["loc"])
    set_by = {setting: variable for variable, setting in setting_variables().items()}
    variable = next(
        (
            set_by[loc[:depth]]
            for depth in (2, 1)
            if loc[:depth] in set_by and set_by[loc[:depth]] in {k.upper() for k in environ}
        ),
        None,
    )
    where = f"environment variable {variable}" if variable else str(config_file or "defaults")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if error["type"] == "extra_forbidden":
        return (
            f"unknown key {_key_name(loc)} in {where}{more}; "
            "see `medzip config example` for the keys"
        )
    value = error.get("input")
    shown = ""
    if isinstance(value, (str, int, float, bool)) and "password" not in str(loc[-1]):
        shown = f", got {redact_url(str(value))!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{_key_name(loc)} in {where}: {message}{shown}{more}"


def load_settings(config_file: Path | None = None) -> Settings:
    """Build the settings from an optional TOML file and the ``MEDZIP_*`` environment.

    Raises
    ------
    ConfigError
        The file cannot be read or is not TOML, a key or variable is unknown, or a value
        is invalid.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(
                f"cannot read configuration file {config_file}: {exc.strerror}"
            ) from None
    _refuse_unknown_variables(os.environ)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe_invalid(exc, config_file, os.environ)) from None


def describe_storage_failure(settings: Settings, exc: Exception) -> str | None:
    """One line for the user when the archive of ``settings`` cannot be opened because of
    ``exc`` (its blob key missing or wrong, a folder or file it cannot write, a database it
    cannot reach); None for other exceptions. Never shows a password of the database URL."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    from medzip_scp.identity.keys import IdentityKeyError
    from medzip_scp.storage.local import KeyFileError

    if isinstance(exc, KeyFileError | IdentityKeyError):
        return str(exc)  # names the key file (and the key id the blobs need)
    storage = settings.storage
    url = redact_url(storage.resolved_database_url())
    if isinstance(exc, OSError) and exc.filename is not None:
        return (
            f"cannot write {exc.filename}: {exc.strerror}; the data folder "
            f"{storage.data_dir.resolve()} must be a folder this user can write: fix its "
            "owner or permissions, or give another --data-dir ([storage] data_dir)"
        )
    if isinstance(exc, OperationalError):
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        if url.startswith("sqlite"):
            return (
                f"cannot write the index database {url.split(':///', 1)[-1]}: {reason}; the "
                f"data folder {storage.data_dir.resolve()} and the files in it must be "
                "writable by this user"
            )
        return (
            f"cannot reach the index database at {url}: {redact_url(reason)}; check that it "
            "runs and accepts connections, and [storage] database_url "
            "(MEDZIP_STORAGE__DATABASE_URL)"
        )
    if isinstance(exc, ArgumentError):
        return (
            f"[storage] database_url {url!r} is not a usable SQLAlchemy URL ({exc}); "
            "e.g. postgresql+psycopg://medzip@db.example/medzip, or empty for SQLite"
        )
    return None


def parse_destination(text: str) -> MoveDestination:
    """Parse ``AET=HOST:PORT`` (the ``--move-destination`` flag)."""
    try:
        aet, address = text.split("=", 1)
        host, port = address.rsplit(":", 1)
        return MoveDestination(ae_title=aet.strip(), host=host.strip("[] "), port=int(port))
    except ValueError as exc:
        raise ValueError(
            f"a C-MOVE destination is AET=HOST:PORT (e.g. VIEWER=10.0.0.5:11112), got {text!r}"
        ) from exc


EXAMPLE_CONFIG = """\
# medzip node configuration (TOML). Every key is optional; the values shown are the defaults.
# Environment variables override the file: MEDZIP_<SECTION>__<KEY>, e.g. MEDZIP_NODE__PORT=104.
# Command-line flags (--port, --aet, --data-dir, --move-destination) override both.

log_level = "INFO"
log_format = "text"          # or "json": one JSON object per log line (for log shippers)

[node]
ae_title = "MEDZIP"          # our AE title; associations calling another title are rejected
bind = "0.0.0.0"
port = 11112
max_pdu = 262144              # longest P-DATA-TF we accept; longer ones abort the association
max_associations = 32
max_associations_per_address = 16   # open connections from one address; more are closed at once
# processes = 2              # node processes sharing the port; default: one per CPU core
                             # (at most 8) on Linux, 1 elsewhere
network_timeout = 60.0       # also: the longest a peer may stall mid-PDU before it is dropped
association_request_timeout = 10.0  # a new connection's time to send its A-ASSOCIATE-RQ
dimse_timeout = 60.0

[storage]
data_dir = "medzip-data"     # SQLite index, blobs, keys and the incoming spool live here
database_url = ""            # e.g. "postgresql+psycopg://medzip@db.example/medzip"; empty: SQLite
# blob_dir = "/srv/medzip/blobs"
# key_file = "/etc/medzip/blob.key"   # 32-byte blob encryption key; created on first start
duplicate_policy = "reject"  # differing copy of a stored SOP Instance UID: "reject" (0x0111)
                             # or "replace" (the old copy is kept as a superseded version)
allow_delete = false         # `medzip studies delete` (node stopped, audited); off: kept

[access]
check_called_ae = true
# Unknown calling AEs: the embedded default accepts any AE title from loopback only.
# To open the node to a network, widen unknown_ae_hosts; to close it to unknown AEs,
# set allow_unknown_ae = false and list every peer below.
allow_unknown_ae = true
unknown_ae_hosts = ["127.0.0.1/32", "::1/128"]
unknown_ae_rights = ["echo", "store", "find", "get", "move"]

# [[access.peers]]
# ae_title = "CT_SCANNER"
# hosts = ["10.0.0.21"]        # empty: any host
# rights = ["echo", "store"]
#
# [[access.peers]]
# ae_title = "VIEWER"
# rights = ["echo", "find", "get", "move"]

[retrieve]
get_without_role_selection = true   # C-GET for peers that send no SCP/SCU role selection

# [[retrieve.destinations]]          # C-MOVE destinations (also --move-destination AET=HOST:PORT)
# ae_title = "VIEWER"
# host = "10.0.0.50"
# port = 11112

[query]
# C-FIND matches answered; past it the first max_answers go out, then the final status
# 0xA700 (Refused: Out of Resources) with an Error Comment.
max_answers = 10000
# Specific Character Set of C-FIND responses to queries that name none (UTF-8); values it
# cannot encode are sent in ISO_IR 192. Queries that name one are answered in it.
character_set = "ISO_IR 192"

[pipeline]
compress = true              # compress stored originals in the background (medzip serve);
                             # or run `medzip worker` processes and set this to false
poll_seconds = 2.0
series_quiet_seconds = 0.0   # wait until a series is quiet this long before compressing it,
                             # then code it as a whole (e.g. 60; 0: as instances arrive)
learned = false              # also try the learned paths: < 2 % smaller, 30-200x slower
# models_dir = "/opt/medzip/models"  # the codec's models; default: the installation's models/

[identity]
# The patient's identifying attributes of every compressed instance are sealed (AES-256-GCM,
# Ed25519-signed) inside its coded pixel streams and removed from the stored data set.
# key_file = "/etc/medzip/identity.json"   # default data_dir/keys/identity.json; created on
                             # first start. Back it up: without it, names and IDs are gone.
extra_attributes = []        # keywords to seal besides the basic profile's, e.g. ["StudyComments"]
private_elements = false     # also seal every private element
check_on_retrieve = false    # also compare the index with the sealed identity on every
                             # retrieval (strict: a study renamed by later instances is refused)
sweep_hours = 0.0            # verify every instance this often in the node (0: never)

[monitoring]
# port = 9100                # HTTP: /metrics (Prometheus), /healthz (alive), /readyz (index and
                             # blob store answer); off without a port
bind = "127.0.0.1"           # "0.0.0.0" in a container, for the probes and the scraper

[audit]
enabled = true               # one JSON line per store, query, retrieve, verify and delete:
                             # who (AE title, address, user), what (UIDs, counts), outcome
# file = "/var/log/medzip/audit.jsonl"   # default data_dir/audit/audit.jsonl
max_bytes = 10485760         # rotate at this size; the node writes, never rewrites
backups = 10

[tls]
enabled = false
# certificate = "/etc/medzip/node.crt"
# private_key = "/etc/medzip/node.key"
# ca_certificates = "/etc/medzip/ca.crt"
# require_client_certificate = false   # true: mutual TLS
"""
