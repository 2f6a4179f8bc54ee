"""The ``medzip`` command: builds everything from the configuration and calls lower layers."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core
from pydantic import ValidationError

from medzip_scp.cli.bench import bench_app
from medzip_scp.cli.codec import codec_app
from medzip_scp.cli.train import train_app
from medzip_scp.config import (
    DEBUG_VARIABLE,
    EXAMPLE_CONFIG,
    AccessSettings,
    ConfigError,
    NodeSettings,
    Settings,
    StorageSettings,
    describe_storage_failure,
    load_settings,
    parse_destination,
)

if TYPE_CHECKING:
    from medzip_scp.archive import Archive
    from medzip_scp.index.studies import StudySummary


class _OneLineErrors(typer.core.TyperGroup):
    """The ``medzip`` group: an unexpected exception in a command prints one line (its
    traceback with ``--debug`` or ``MEDZIP_DEBUG=1``) and exits 1."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors and deliberate exits, printed as they are
        except Exception as exc:
            if ctx.meta.get("medzip.debug") or os.environ.get(DEBUG_VARIABLE) == "1":
                raise
            command = ctx.invoked_subcommand or ""
            what = str(exc).splitlines()[0] if str(exc) else "failed"
            typer.echo(
                f"medzip {command}: {what} ({type(exc).__name__}); run "
                f"`medzip --debug {command} ...` for the traceback",
                err=True,
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    help="medzip: a lossless DICOM archive node.", no_args_is_help=True, cls=_OneLineErrors
)
config_app = typer.Typer(help="Configuration helpers.", no_args_is_help=True)
db_app = typer.Typer(help="Index database maintenance.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Keys: the blob encryption key and the identity keys.", no_args_is_help=True
)
studies_app = typer.Typer(
    help="Studies: list, show and delete (the patient's name shows on this terminal only).",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(studies_app, name="studies")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file.", exists=True)
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (database, blobs, keys).")
]


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show the traceback of an error ({DEBUG_VARIABLE}=1)."),
    ] = False,
) -> None:
    ctx.meta["medzip.debug"] = debug


def _fail(message: str) -> typer.Exit:
    """Print ``message`` as the one line of a failed command; raise what this returns."""
    typer.echo(f"medzip: {message}", err=True)
    return typer.Exit(1)


def _settings(
    config: Path | None,
    data_dir: Path | None = None,
    port: int | None = None,
    aet: str | None = None,
    move_destinations: list[str] | None = None,
    allow: list[str] | None = None,
) -> Settings:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    # Flags beat the environment: apply them to the validated sections, not as init values.
    storage = {"data_dir": data_dir} if data_dir is not None else {}
    node = {k: v for k, v in (("port", port), ("ae_title", aet)) if v is not None}
    try:
        settings.storage = StorageSettings.model_validate(settings.storage.model_dump() | storage)
        settings.node = NodeSettings.model_validate(settings.node.model_dump() | node)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = {"port": "--port", "ae_title": "--aet"}.get(str(error["loc"][-1]), "--data-dir")
        raise _fail(f"{flag}: {error['msg'].removeprefix('Value error, ')}") from None
    if allow:
        try:  # loopback stays allowed: the node's own tools and probes use it
            settings.access = AccessSettings.model_validate(
                settings.access.model_dump()
                | {"unknown_ae_hosts": [*settings.access.unknown_ae_hosts, *allow]}
            )
        except ValidationError as exc:
            message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise _fail(f"--allow: {message} (a network is 10.0.0.0/8)") from None
    for text in move_destinations or []:
        try:
            dest = parse_destination(text)
        except ValueError as exc:
            raise _fail(f"--move-destination: {exc}") from None
        settings.retrieve.destinations = [
            d for d in settings.retrieve.destinations if d.ae_title != dest.ae_title
        ] + [dest]
    return settings


@contextmanager
def _storage_failures(settings: Settings) -> Iterator[None]:
    """A one-line error and exit 1 when the archive's key is missing or wrong, its data
    folder cannot be written or its database cannot be reached."""
    try:
        yield
    except Exception as exc:
        message = describe_storage_failure(settings, exc)
        if message is None:
            raise
        raise _fail(message) from None


def _open_archive(settings: Settings, migrate: bool = True, need_identity: bool = True) -> Archive:
    """The archive, or a one-line error and exit 1 (see :func:`_storage_failures`)."""
    from medzip_scp.archive import Archive

    with _storage_failures(settings):
        return Archive.open(settings, migrate=migrate, need_identity=need_identity)


class _JsonLines(logging.Formatter):
    """``log_format = "json"``: one JSON object per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonLines())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def _audit(settings: Settings) -> None:
    """Audit this command's acts into the node's trail (the node rotates it)."""
    if settings.audit.enabled:
        from medzip_scp.audit import configure_audit

        file = settings.audit.resolved_file(settings.storage.data_dir)
        configure_audit(file, settings.audit.max_bytes, settings.audit.backups, rotates=False)


@app.command()
def serve(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    port: Annotated[int | None, typer.Option("--port", help="DICOM port.")] = None,
    aet: Annotated[str | None, typer.Option("--aet", help="Our AE title.")] = None,
    move_destination: Annotated[
        list[str] | None,
        typer.Option("--move-destination", help="C-MOVE destination AET=HOST:PORT (repeatable)."),
    ] = None,
    processes: Annotated[
        int | None, typer.Option("--processes", help="Node processes sharing the port.", min=1)
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="Also accept unknown calling AEs from this network (CIDR, repeatable), "
            "e.g. 10.0.0.0/8; [access] in the config file lists peers and rights.",
        ),
    ] = None,
) -> None:
    """Run the DICOM node (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE) until stopped."""
    from medzip_scp.net.supervisor import NodeError, run_node

    settings = _settings(config, data_dir, port, aet, move_destination, allow)
    if processes is not None:
        settings.node.processes = processes
    _logging(settings.log_level, settings.log_format)
    try:
        configure_logging = functools.partial(_logging, log_format=settings.log_format)
        run_node(settings, say=typer.echo, configure_logging=configure_logging)
    except NodeError as exc:
        raise _fail(str(exc)) from None


@app.command()
def worker(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    shard: Annotated[
        str,
        typer.Option(
            "--shard", help="K/N: take every N-th pending instance (N workers share the work)."
        ),
    ] = "0/1",
) -> None:
    """Compress stored originals (verify-before-replace) in a separate process."""
    from medzip_scp.pipeline.compress import compress_pending, parse_shard, run_worker

    try:
        part = parse_shard(shard)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard") from None
    settings = _settings(config, data_dir)
    _logging(settings.log_level, settings.log_format)
    archive = _open_archive(settings)
    codec = archive.compressing_codec()
    if once:
        summary = compress_pending(
            archive, codec, progress=_progress_bar("compressing"), shard=part
        )
        typer.echo(summary.table())
        if summary.interrupted:
            raise typer.Exit(130)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    os.nice(10)  # background work: C-STOREs on the same machine come first
    typer.echo("compression worker running; Ctrl-C to stop")
    run_worker(archive, codec, stop, settings.pipeline.poll_seconds, shard=part)


@app.command()
def status(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show the compression backlog and failures, bytes received and stored per modality, the
    keys and models in use, and the last verification (counts only, no patient data)."""
    from medzip_scp.pipeline.status import archive_status

    settings = _settings(config, data_dir)
    _logging("WARNING")
    report = archive_status(_open_archive(settings, need_identity=False))
    typer.echo(report.json() if as_json else report.table())


@config_app.command("example")
def config_example() -> None:
    """Print a commented example configuration file."""
    typer.echo(EXAMPLE_CONFIG, nl=False)


@config_app.command("show")
def config_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the effective configuration (file + environment + flags) as JSON."""
    settings = _settings(config, data_dir)
    typer.echo(settings.model_dump_json(indent=2))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Bring the index database schema to the newest migration."""
    from medzip_scp.index.db import current_revision, upgrade_database

    settings = _settings(config, data_dir)
    url = settings.storage.resolved_database_url()
    with _storage_failures(settings):
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_database(url)
        revision = current_revision(url)
    typer.echo(f"database at revision {revision}")


@db_app.command("current")
def db_current(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the schema revision of the index database."""
    from medzip_scp.index.db import current_revision

    settings = _settings(config, data_dir)
    with _storage_failures(settings):
        revision = current_revision(settings.storage.resolved_database_url())
    typer.echo(revision or "empty")


@db_app.command("rebuild")
def db_rebuild(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="Build into this empty database, not the configured one."
        ),
    ] = None,
) -> None:
    """Build a new index from the blob store and the keys alone (the index lost, or moving
    to another database), into an empty database, with the node stopped. Every blob is
    authenticated and checked; one that fails is listed, not indexed. Exits 1 unless every
    blob was indexed."""
    from medzip_scp.config import redact_url
    from medzip_scp.net.supervisor import NodeError, hold_data_dir
    from medzip_scp.pipeline.rebuild import IndexNotEmptyError, rebuild_index

    settings = _settings(config, data_dir)
    if database_url is not None:
        settings.storage = StorageSettings.model_validate(
            settings.storage.model_dump() | {"database_url": database_url}
        )
    _logging("WARNING")
    try:
        held = hold_data_dir(settings.storage.data_dir)  # no node stores or compresses meanwhile
    except NodeError as exc:
        raise _fail(str(exc)) from None
    try:
        archive = _open_archive(settings, need_identity=False)
        report = rebuild_index(archive, progress=_progress_bars())
    except IndexNotEmptyError as exc:
        url = redact_url(settings.storage.resolved_database_url())
        raise _fail(
            f"{exc} ({url}): move it away, or give --database-url for an empty one"
        ) from None
    finally:
        os.close(held)
    typer.echo(report.table())
    raise typer.Exit(0 if report.complete else 1)


@keys_app.command("show")
def keys_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the ids of the blob key and of the identity keys (never the keys), creating
    them for an archive that holds nothing yet."""
    settings = _settings(config, data_dir)
    archive = _open_archive(settings)
    typer.echo(
        f"blob key id {archive.blobs.key_id.hex()} in {settings.storage.resolved_key_file()}"
    )
    _echo_identity_keys(archive)


@keys_app.command("rotate")
def keys_rotate(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Add a new identity key generation: new blobs are sealed and signed with it; every
    older generation stays in the key file, so old blobs still open and verify."""
    settings = _settings(config, data_dir)
    archive = _open_archive(settings)
    assert archive.identity is not None  # opened with need_identity
    try:
        generation = archive.identity.rotate()
    except OSError as exc:
        raise _fail(
            f"cannot write the identity key file {archive.identity.path}: {exc.strerror}; "
            "nothing was changed ([identity] key_file must be writable by this user)"
        ) from None
    typer.echo(
        f"added identity key generation {len(archive.identity.generations)}: master key "
        f"{generation.master_id.hex()}, signing key {generation.signing_id.hex()}; restart the "
        "node (and workers) to seal with it, and back up "
        f"{archive.identity.path}"
    )


@keys_app.command("export-public")
def keys_export_public(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Write the public verification keys (every generation; no secret): with them anyone
    can check that a blob's identity payload was signed by this node."""
    settings = _settings(config, data_dir)
    archive = _open_archive(settings)
    assert archive.identity is not None
    text = archive.identity.export_public() + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        try:
            output.write_text(text)
        except OSError as exc:
            raise _fail(f"cannot write {output}: {exc.strerror}; give another --output") from None
        typer.echo(f"wrote {len(archive.identity.generations)} public keys to {output}")


def _echo_identity_keys(archive: Archive) -> None:
    keyring = archive.identity
    if keyring is None:
        typer.echo("identity keys: none (the key file is missing)")
        return
    typer.echo(f"identity keys in {keyring.path} (node {keyring.node_id}):")
    for number, g in enumerate(keyring.generations, 1):
        current = " (current)" if g is keyring.current else ""
        typer.echo(
            f"  generation {number}{current}: master key {g.master_id.hex()}, signing key "
            f"{g.signing_id.hex()}, created {g.created}"
        )


@app.command()
def verify(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    sop_instance_uid: Annotated[
        list[str] | None, typer.Option("--uid", help="Only these SOP Instance UIDs.")
    ] = None,
    study: Annotated[str | None, typer.Option("--study", help="Only this study.")] = None,
    series: Annotated[str | None, typer.Option("--series", help="Only this series.")] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only instances received since this date (YYYY-MM-DD)."),
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every instance (the default without a selection).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check each instance: blob, decode, sealed identity (signature, key, pixel and data set
    hashes) and the index row. Exits 1 unless every one is OK."""
    import datetime as dt

    from medzip_scp.pipeline.verify import InstanceFilter, verify_archive

    if every and (sop_instance_uid or study or series or since):
        raise typer.BadParameter("--all checks every instance: give it alone", param_hint="--all")
    since_date = None
    if since is not None:
        try:
            since_date = dt.datetime.fromisoformat(since).replace(tzinfo=dt.UTC)
        except ValueError:
            raise typer.BadParameter(
                f"a date is YYYY-MM-DD (or an ISO date and time), got {since!r}",
                param_hint="--since",
            ) from None
    which = InstanceFilter(tuple(sop_instance_uid or ()), study, series, since_date)
    settings = _settings(config, data_dir)
    _logging("WARNING")
    archive = _open_archive(settings, need_identity=False)
    _audit(settings)
    report = verify_archive(archive, which, progress=_progress_bar("verifying"))
    typer.echo(report.json() if as_json else report.table())
    raise typer.Exit(0 if report.ok and not report.interrupted else 1)


StudyArgument = Annotated[str, typer.Argument(help="Study Instance UID.")]


def _no_such_study(study: str) -> typer.Exit:
    return _fail(f"no study {study} in the archive (see `medzip studies list`)")


def _study_table(studies: list[StudySummary]) -> str:
    lines = [
        "| Study Instance UID | date | patient ID | patient name | modalities | series "
        "| instances | received bytes | stored bytes |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for s in studies:
        lines.append(
            f"| {s.study_instance_uid} | {s.study_date} | {s.patient_id} | {s.patient_name} "
            f"| {s.modalities} | {s.series} | {s.instances} | {s.original_bytes} "
            f"| {s.stored_bytes} |"
        )
    return "\n".join(lines)


@studies_app.command("list")
def studies_list(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many.", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON.")] = False,
) -> None:
    """List the studies, newest study date first: UID, date, patient, modalities, counts."""
    from medzip_scp.audit import local_user, record

    settings = _settings(config, data_dir)
    _logging("WARNING")
    studies = _open_archive(settings, need_identity=False).studies(limit=limit)
    _audit(settings)
    record("list", "success", user=local_user(), studies=len(studies))  # names shown
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(s) for s in studies], indent=1))
    else:
        typer.echo(_study_table(studies))


@studies_app.command("show")
def studies_show(
    study: StudyArgument,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
) -> None:
    """Show one study and its series."""
    from medzip_scp.audit import local_user, record

    settings = _settings(config, data_dir)
    _logging("WARNING")
    archive = _open_archive(settings, need_identity=False)
    _audit(settings)
    found = archive.studies(study)
    record("show", "success" if found else "failure", user=local_user(), study_instance_uid=study)
    if not found:
        raise _no_such_study(study)
    series = archive.series_of(study)
    if as_json:
        document = dataclasses.asdict(found[0]) | {
            "series": [dataclasses.asdict(s) for s in series]
        }
        typer.echo(json.dumps(document, indent=1))
        return
    lines = [
        _study_table(found),
        "",
        "| Series Instance UID | number | modality | description | instances | received bytes "
        "| stored bytes |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for s in series:
        lines.append(
            f"| {s.series_instance_uid} | {'' if s.series_number is None else s.series_number} "
            f"| {s.modality} | {s.series_description} | {s.instances} | {s.original_bytes} "
            f"| {s.stored_bytes} |"
        )
    typer.echo("\n".join(lines))


@studies_app.command("delete")
def studies_delete(
    study: StudyArgument,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask; delete.")] = False,
) -> None:
    """Delete a study for good: its index rows, then its blobs; audited. Needs the
    storage setting allow_delete = true; the node may keep serving meanwhile."""
    from medzip_scp.audit import local_user, record

    settings = _settings(config, data_dir)
    _logging("WARNING")
    if not settings.storage.allow_delete:
        raise _fail(
            "deleting studies is off: set allow_delete = true under [storage] in the "
            "configuration (or MEDZIP_STORAGE__ALLOW_DELETE=true) to allow it"
        )
    archive = _open_archive(settings, need_identity=False)
    _audit(settings)
    found = archive.studies(study)
    if not found:
        raise _no_such_study(study)
    summary = found[0]
    if not yes:
        typer.confirm(
            f"delete study {study} ({summary.instances} instances, {summary.series} "
            "series) for good?",
            abort=True,
        )
    deleted: int | None = None
    try:
        deleted = archive.delete_study(study)
    finally:  # also when it failed half-way (the node finishes it at its next start)
        record(
            "delete",
            "success" if deleted is not None else "failure",
            user=local_user(),
            study_instance_uid=study,
            instances=summary.instances,
            blobs=deleted or 0,
        )
    typer.echo(
        f"deleted study {study}: {summary.instances} instances in {summary.series} series, "
        f"{deleted} blobs"
    )


@app.command()
def export(
    study: StudyArgument,
    to: Annotated[Path, typer.Option("--to", help="Folder to write the Part-10 files into.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Write a study's instances as they were received, one Part-10 file each, under
    TO/<Study UID>/<Series UID>/<SOP Instance UID>.dcm; each is checked on the way (as on
    retrieval). Exits 1 unless every instance was written."""
    from medzip_scp.archive import InstanceIntegrityError
    from medzip_scp.audit import local_user, record

    settings = _settings(config, data_dir)
    _logging("WARNING")
    archive = _open_archive(settings, need_identity=False)
    _audit(settings)
    rows = archive.study_instance_rows(study)
    if not rows:
        raise _no_such_study(study)
    progress = _progress_bar("exporting")
    written, failed, size = 0, [], 0
    interrupted = False
    try:
        for done, row in enumerate(rows, 1):
            try:
                part10 = archive.load_part10(row)
            except InstanceIntegrityError as exc:
                failed.append((row.sop_instance_uid, exc.reason))
            else:
                folder = to / study / (_series_uid_of(part10) or "unknown-series")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{row.sop_instance_uid}.dcm").write_bytes(part10)
                written += 1
                size += len(part10)
            if progress is not None:  # failed ones count as done too
                progress(done, len(rows))
    except KeyboardInterrupt:
        interrupted = True
    record(
        "export",
        "interrupted" if interrupted else "success" if not failed else "failure",
        user=local_user(),
        study_instance_uid=study,
        written=written,
        failed=len(failed),
    )
    typer.echo(
        "| instances | written | failed | bytes |\n|---:|---:|---:|---:|\n"
        f"| {len(rows)} | {written} | {len(failed)} | {size} |"
    )
    for uid, reason in failed:
        typer.echo(f"not exported: {uid}: {reason}")
    if interrupted:
        typer.echo("interrupted: the files above are the ones written so far")
    raise typer.Exit(0 if written == len(rows) else 1)


def _series_uid_of(part10: bytes) -> str:
    from medzip_scp.dicom.part10 import instance_uids

    return instance_uids(part10)[1]


def _progress_bar(label: str) -> Callable[[int, int], None] | None:
    """A progress callback drawing a bar on stderr, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import Progress

    progress = Progress(console=Console(stderr=True), transient=True)
    task = progress.add_task(label, total=None)
    progress.start()

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)
        if done >= total:
            progress.stop()

    return update


def _progress_bars() -> Callable[[str, int, int], None] | None:
    """A progress callback drawing a bar per phase on stderr (each from the phase's first
    report on), or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    bars: dict[str, Callable[[int, int], None] | None] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = _progress_bar(phase)
        bar = bars[phase]
        if bar is not None:
            bar(done, total)

    return update


app.add_typer(codec_app, name="codec", help="Encode, decode and inspect .mzp blobs.")
app.add_typer(train_app, name="train", help="Train the codec models (local, global, prior).")
app.add_typer(bench_app, name="bench", help="Run a benchmark of the checkout (codec, ingest).")


if __name__ == "__main__":
    app()
