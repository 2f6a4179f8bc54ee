"""The ``medzip`` command: builds everything from the configuration and calls lower layers."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medzip_scp.cli.bench import bench_app
from medzip_scp.cli.codec import codec_app
from medzip_scp.cli.train import train_app
from medzip_scp.config import (
    EXAMPLE_CONFIG,
    NodeSettings,
    Settings,
    StorageSettings,
    load_settings,
    parse_destination,
)

if TYPE_CHECKING:
    from medzip_scp.archive import Archive

app = typer.Typer(help="medzip: a lossless DICOM archive node.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration helpers.", no_args_is_help=True)
db_app = typer.Typer(help="Index database maintenance.", no_args_is_help=True)
keys_app = typer.Typer(help="Blob encryption keys.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file.", exists=True)
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (database, blobs, keys).")
]


def _settings(
    config: Path | None,
    data_dir: Path | None = None,
    port: int | None = None,
    aet: str | None = None,
    move_destinations: list[str] | None = None,
) -> Settings:
    settings = load_settings(config)
    # Flags beat the environment: apply them to the validated sections, not as init values.
    storage = {"data_dir": data_dir} if data_dir is not None else {}
    node = {k: v for k, v in (("port", port), ("ae_title", aet)) if v is not None}
    settings.storage = StorageSettings.model_validate(settings.storage.model_dump() | storage)
    settings.node = NodeSettings.model_validate(settings.node.model_dump() | node)
    for text in move_destinations or []:
        dest = parse_destination(text)
        settings.retrieve.destinations = [
            d for d in settings.retrieve.destinations if d.ae_title != dest.ae_title
        ] + [dest]
    return settings


def _open_archive(settings: Settings, migrate: bool = True) -> Archive:
    """The archive, or a one-line error and exit 1 when its key is missing or wrong."""
    from medzip_scp.archive import Archive
    from medzip_scp.storage.local import KeyFileError

    try:
        return Archive.open(settings, migrate=migrate)
    except KeyFileError as exc:
        typer.echo(f"medzip: {exc}", err=True)
        raise typer.Exit(1) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
) -> None:
    """Run the DICOM node (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE) until stopped."""
    from medzip_scp.net.server import describe_startup, start_server

    settings = _settings(config, data_dir, port, aet, move_destination)
    if processes is not None:
        settings.node.processes = processes
    _logging(settings.log_level)
    archive = _open_archive(settings)
    threading.Thread(target=archive.remove_orphan_blobs, name="medzip-orphans", daemon=True).start()
    shutil.rmtree(settings.storage.incoming_dir(), ignore_errors=True)  # before any process
    # One Unix socket pair per further process: this process accepts every association
    # and passes each to the next process in turn (see medzip_scp.net.server). It binds the
    # port first, so a port in use fails before any other process exists; connections
    # handed to a process that is still starting wait in its socket pair.
    pairs = [
        socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for _ in range(1, settings.node.processes)
    ]
    children: list[multiprocessing.process.BaseProcess] = []
    server = None
    try:
        server = start_server(archive, dispatch_to=[ours for ours, _theirs in pairs])
        spawn = multiprocessing.get_context("spawn")
        listening = [spawn.Event() for _ in pairs]
        children = [
            spawn.Process(
                target=_serve_child,
                args=(settings, archive.store_activity, pairs[i][1], listening[i], i + 1),
                name=f"medzip-node-{i + 1}",
            )
            for i in range(len(pairs))
        ]
        for child in children:
            child.start()
        for _ours, theirs in pairs:
            theirs.close()  # the child holds its own copy
        # "ready" only once every process serves associations
        for child, event in zip(children, listening, strict=True):
            while not event.wait(0.2):
                if not child.is_alive():
                    raise _StartFailed(f"node process {child.name} exited ({child.exitcode})")
    except BaseException as exc:
        if server is not None:
            server.shutdown()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        for child in children:
            child.terminate()
        if isinstance(exc, OSError | _StartFailed):
            node = settings.node
            typer.echo(f"cannot serve on {node.bind}:{node.port}: {exc}", err=True)
            raise typer.Exit(1) from None
        raise
    stop = threading.Event()
    compressing = _start_compression(archive, stop, number=0)
    for line in describe_startup(archive):
        typer.echo(line)
    typer.echo(
        "background compression: "
        + ("on (originals replaced only after a bit-exact decode)" if compressing else "off")
    )
    typer.echo("ready; Ctrl-C to stop")
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    typer.echo("stopping: finishing open associations")
    # Stop taking associations first (this also closes the other processes' socket pairs),
    # so none is handed to a process that is stopping; then each finishes its own.
    server.shutdown()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=60)
    if compressing is not None:
        compressing.join(timeout=60)


def _start_compression(
    archive: Archive, stop: threading.Event, number: int
) -> threading.Thread | None:
    """Node process ``number`` compresses its share of the backlog (``[pipeline] compress``)
    in a background thread until ``stop`` is set; ``None`` when compression is off."""
    from medzip_scp.archive import CODECS, MzpCodec
    from medzip_scp.pipeline.compress import run_worker

    settings = archive.settings
    if not settings.pipeline.compress:
        return None
    worker = threading.Thread(
        target=run_worker,
        args=(archive, CODECS[MzpCodec.codec_id], stop, settings.pipeline.poll_seconds),
        kwargs={"shard": (number, settings.node.processes)},
        name="medzip-compress",
        daemon=True,
    )
    worker.start()
    return worker


class _StartFailed(Exception):
    """A node process did not come up."""


def _serve_child(
    settings: Settings,
    store_activity: ctypes.c_double,
    channel: socket.socket,
    listening: EventType,
    number: int,
) -> None:
    """Node process ``number`` of ``[node] processes``: serves the associations the first
    process passes over ``channel`` (sets ``listening`` once it does) and compresses its
    share of the backlog while no C-STORE arrives."""
    from medzip_scp.archive import Archive
    from medzip_scp.net.server import start_server

    _logging(settings.log_level)
    archive = Archive.open(settings, migrate=False)
    archive.store_activity = store_activity
    stop = threading.Event()
    server = start_server(archive, forwarded=(channel, stop.set))
    listening.set()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    compressing = _start_compression(archive, stop, number)
    stop.wait()
    server.shutdown()
    if compressing is not None:
        compressing.join(timeout=60)


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
    from medzip_scp.archive import CODECS, MzpCodec
    from medzip_scp.pipeline.compress import compress_pending, parse_shard, run_worker

    try:
        part = parse_shard(shard)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard") from None
    settings = _settings(config, data_dir)
    _logging(settings.log_level)
    archive = _open_archive(settings)
    codec = CODECS[MzpCodec.codec_id]
    if once:
        summary = compress_pending(
            archive, codec, progress=_progress_bar("compressing"), shard=part
        )
        typer.echo(
            "| compressed | failed | skipped | original bytes | stored bytes | ratio |\n"
            "|---|---|---|---|---|---|\n"
            f"| {summary.compressed} | {summary.failed} | {summary.skipped} "
            f"| {summary.original_bytes} | {summary.stored_bytes} | {summary.ratio:.2f} |"
        )
        for uid, reason in summary.failures:
            typer.echo(f"failed: {uid}: {reason}")
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    os.nice(10)  # background work: C-STOREs on the same machine come first
    typer.echo("compression worker running; Ctrl-C to stop")
    run_worker(archive, codec, stop, settings.pipeline.poll_seconds, shard=part)


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
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.storage.resolved_database_url()
    upgrade_database(url)
    typer.echo(f"database at revision {current_revision(url)}")


@db_app.command("current")
def db_current(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the schema revision of the index database."""
    from medzip_scp.index.db import current_revision

    settings = _settings(config, data_dir)
    typer.echo(current_revision(settings.storage.resolved_database_url()) or "empty")


@keys_app.command("show")
def keys_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the id of the blob key (never the key itself), creating it for an archive that
    holds no blob yet."""
    from medzip_scp.storage.local import KeyFileError, open_blob_key

    settings = _settings(config, data_dir)
    path = settings.storage.resolved_key_file()
    try:
        key = open_blob_key(path, settings.storage.resolved_blob_dir())
    except KeyFileError as exc:
        typer.echo(f"medzip: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"blob key id {key.key_id.hex()} in {path}")


@app.command()
def verify(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    sop_instance_uid: Annotated[
        list[str] | None, typer.Option("--uid", help="Only these SOP Instance UIDs.")
    ] = None,
) -> None:
    """Decode every stored instance and check it against the hashes in the index."""
    from medzip_scp.pipeline.verify import verify_archive

    settings = _settings(config, data_dir)
    _logging("WARNING")
    archive = _open_archive(settings)
    report = verify_archive(archive, sop_instance_uid, progress=_progress_bar("verifying"))
    typer.echo(report.table())
    raise typer.Exit(0 if report.ok else 1)


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


app.add_typer(codec_app, name="codec", help="Encode, decode and inspect .mzp blobs.")
app.add_typer(train_app, name="train", help="Train the learned codec models (local, global).")
app.add_typer(bench_app, name="bench", help="Run a benchmark of the checkout (codec, ingest).")


if __name__ == "__main__":
    app()
