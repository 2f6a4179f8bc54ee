"""``medzip codec``: encode DICOM files to ``.mzp`` blobs, decode them, inspect them.

Each command takes a file or a folder (recursed; the output folder mirrors the input's
relative names, adding or removing ``.mzp``). One JSON line per file goes to stdout; a
progress bar (only when stderr is a terminal) and, for folders, a summary table go to stderr.
No dataset values are printed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medzip_scp.codec.api import DEFAULT_LEARNED, LearnedOptions
from medzip_scp.codec.errors import CodecError
from medzip_scp.codec.installation import CodecInstallError, check_codec
from medzip_scp.codec.zoo import use_models_folder
from medzip_scp.dicom.blob import blob_info, encode_dataset
from medzip_scp.dicom.identifying import identifying_tags
from medzip_scp.identity.instance import (
    IdentityCheckError,
    IdentityPolicy,
    open_instance,
    seal_instance,
    stored_object,
)
from medzip_scp.identity.keys import IdentityKeyError, IdentityKeyring, PublicKeys
from medzip_scp.identity.payload import PayloadTamperedError, check_signature

__all__ = ["codec_app"]

SUFFIX = ".mzp"

codec_app = typer.Typer(help="Encode, decode and inspect .mzp blobs.", no_args_is_help=True)

InArg = Annotated[Path, typer.Argument(exists=True, help="Input file or folder.")]
OutArg = Annotated[Path, typer.Argument(help="Output file or folder.")]
JobsOption = Annotated[
    int,
    typer.Option("--jobs", "-j", min=0, help="Files coded at once (0, the default: one per CPU)."),
]
ModelsOption = Annotated[
    Path | None,
    typer.Option(
        "--models",
        help="Folder of the codec's models: the learned paths' and the predictive prior "
        "(default: the installed models/).",
    ),
]
IdentityKeysOption = Annotated[
    Path | None,
    typer.Option(
        "--identity-keys", exists=True, help="The node's identity key file (secret keys)."
    ),
]


def _inputs(root: Path, want_suffix: str | None) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if want_suffix is not None:
        files = [p for p in files if p.suffix == want_suffix]
    return files


def _target(src: Path, root: Path, out: Path, encode: bool) -> Path:
    if root.is_file():
        if out.is_dir():
            name = src.name + SUFFIX if encode else _strip(src.name)
            return out / name
        return out
    rel = src.relative_to(root)
    name = rel.name + SUFFIX if encode else _strip(rel.name)
    return out / rel.parent / name


def _strip(name: str) -> str:
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name + ".dcm"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    if not sys.stderr.isatty() or total <= 1:
        yield lambda: None
        return
    console = Console(stderr=True)
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _summary(title: str, rows: list[dict[str, Any]], is_folder: bool) -> None:
    if not is_folder:
        return
    ok = [r for r in rows if "error" not in r]
    table = Table(title=title)
    for col in ("files", "ok", "failed", "input MB", "output MB", "ratio", "seconds", "paths"):
        table.add_column(col, justify="right")
    n_in = sum(r.get("input_bytes", 0) for r in ok)
    n_out = sum(r.get("output_bytes", 0) for r in ok)
    paths: Counter[str] = Counter()
    for r in ok:
        paths.update(r.get("paths", []))
    table.add_row(
        str(len(rows)),
        str(len(ok)),
        str(len(rows) - len(ok)),
        f"{n_in / 1e6:.2f}",
        f"{n_out / 1e6:.2f}",
        f"{n_in / n_out:.3f}" if n_out else "-",
        f"{sum(r.get('seconds', 0.0) for r in rows):.2f}",
        ", ".join(f"{k} {v}" for k, v in paths.most_common()) or "-",
    )
    Console(stderr=True).print(table)


def default_jobs() -> int:
    """Files coded at once: one per CPU this process may use (the codec's C core, OpenJPEG,
    libjxl and CharLS release the GIL, so threads use the cores)."""
    return max(1, len(os.sched_getaffinity(0)))


def _run(
    inp: Path,
    out: Path | None,
    want_suffix: str | None,
    label: str,
    work: Callable[[Path, Path | None], dict[str, Any]],
    jobs: int = 1,
) -> None:
    files = _inputs(inp, want_suffix)

    def one(src: Path) -> dict[str, Any]:
        rel = src.name if inp.is_file() else str(src.relative_to(inp))
        dst = None if out is None else _target(src, inp, out, encode=label == "encode")
        t0 = time.perf_counter()
        try:
            record = {"file": rel, **work(src, dst)}
        except (CodecError, OSError) as exc:
            record = {"file": rel, "error": f"{type(exc).__name__}: {exc}"}
        record.setdefault("seconds", round(time.perf_counter() - t0, 4))
        return record

    rows: list[dict[str, Any]] = []
    with (
        _progress(len(files), label) as advance,
        ThreadPoolExecutor(max(1, min(jobs, len(files) or 1))) as pool,
    ):
        try:
            for record in pool.map(one, files):  # in input order
                rows.append(record)
                _emit(record)
                advance()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            _summary(f"medzip codec {label} (interrupted)", rows, True)
            raise
    _summary(f"medzip codec {label}", rows, inp.is_dir())
    if any("error" in r for r in rows):
        raise typer.Exit(code=1)


def _use_models(folder: Path | None) -> None:
    if folder is None:
        return
    try:
        use_models_folder(folder)
    except ValueError as exc:
        typer.echo(f"medzip codec: --models: {exc}", err=True)
        raise typer.Exit(1) from None


def _check_codec(learned: LearnedOptions | None) -> None:
    try:
        check_codec(learned)
    except CodecInstallError as exc:
        typer.echo(f"medzip codec: {exc}", err=True)
        raise typer.Exit(1) from None


def _keyring(path: Path | None) -> IdentityKeyring | None:
    if path is None:
        return None
    try:
        return IdentityKeyring.load(path)
    except IdentityKeyError as exc:
        typer.echo(f"medzip codec: {exc}", err=True)
        raise typer.Exit(1) from None


def _encode_one(
    src: Path, dst: Path | None, learned: LearnedOptions | None, keyring: IdentityKeyring | None
) -> dict[str, Any]:
    assert dst is not None
    data = src.read_bytes()
    t0 = time.perf_counter()
    if keyring is None:
        blob = encode_dataset(data, learned)
    else:
        policy = IdentityPolicy(identifying_tags())
        blob = seal_instance(data, keyring, policy, learned)
    seconds = time.perf_counter() - t0
    _write(dst, blob)
    info = blob_info(blob)
    lay = info["layout"]
    pixels = lay["rows"] * lay["columns"] * info["frames"] if lay else 0
    return {
        "mode": info["mode"],
        "pixels": pixels,
        "pixel_bytes": info["pixel_bytes"],
        "total_bytes": info["total_bytes"],
        "input_bytes": len(data),
        "output_bytes": len(blob),
        "bpp": round(8 * info["pixel_bytes"] / pixels, 4) if pixels else None,
        "seconds": round(seconds, 4),
        "model": info["model"],
        "paths": info["paths"],
        "payload_bytes": info["payload_bytes"],
    }


def _decode_one(src: Path, dst: Path | None, keyring: IdentityKeyring | None) -> dict[str, Any]:
    assert dst is not None
    blob = src.read_bytes()
    t0 = time.perf_counter()
    record: dict[str, Any] = {}
    try:
        data, sealed = stored_object(blob)
        if sealed and keyring is None:
            record["identity"] = "unavailable: no identity key file given (--identity-keys)"
        elif sealed:
            data = open_instance(blob, keyring, None).part10
            record["identity"] = "restored"
    except IdentityCheckError as exc:
        raise CodecError(f"{exc.verdict}: {exc.reason}") from None
    seconds = time.perf_counter() - t0
    _write(dst, data)
    return {
        "input_bytes": len(blob),
        "output_bytes": len(data),
        "seconds": round(seconds, 4),
        **record,
    }


def _signature_one(src: Path, dst: Path | None, trusted: PublicKeys) -> dict[str, Any]:
    blob = src.read_bytes()
    try:
        sealed = stored_object(blob)[1]
    except IdentityCheckError as exc:
        raise CodecError(f"{exc.verdict}: {exc.reason}") from None
    if not sealed:
        raise CodecError("the blob carries no identity payload")
    try:
        signer = check_signature(sealed, trusted)
    except PayloadTamperedError as exc:
        raise CodecError(f"TAMPERED: {exc.reason}") from None
    return {"signature": "valid", "signing_key": signer.hex(), "node": trusted.node_id}


def _info_one(src: Path, dst: Path | None) -> dict[str, Any]:
    blob = src.read_bytes()
    info = blob_info(blob)
    info.pop("codec", None)
    info["input_bytes"] = info["output_bytes"] = len(blob)
    return info


@codec_app.command("encode")
def encode(
    inp: InArg,
    out: OutArg,
    learned: Annotated[
        bool,
        typer.Option(
            "--learned", help="Also try the learned paths (< 2 % smaller, 30-200x slower)."
        ),
    ] = False,
    identity_keys: IdentityKeysOption = None,
    jobs: JobsOption = 0,
    models: ModelsOption = None,
) -> None:
    """Encode DICOM file(s) into .mzp blob(s), each verified by decoding it; with
    --identity-keys, the identifying attributes are sealed inside (as the node does)."""
    _use_models(models)
    options = DEFAULT_LEARNED if learned else None
    _check_codec(options)
    work = functools.partial(_encode_one, learned=options, keyring=_keyring(identity_keys))
    _run(inp, out, None, "encode", work, jobs or default_jobs())


@codec_app.command("decode")
def decode(
    inp: InArg,
    out: OutArg,
    identity_keys: IdentityKeysOption = None,
    jobs: JobsOption = 0,
    models: ModelsOption = None,
) -> None:
    """Decode .mzp blob(s) back into the original DICOM file(s), byte for byte. A blob with
    a sealed identity needs --identity-keys for that; without, its pixels still decode
    bit-exact and the file is written without the identifying attributes (reported)."""
    _use_models(models)
    _check_codec(None)
    work = functools.partial(_decode_one, keyring=_keyring(identity_keys))
    _run(inp, out, SUFFIX, "decode", work, jobs or default_jobs())


@codec_app.command("signature")
def signature(
    inp: InArg,
    public_keys: Annotated[
        Path,
        typer.Option(
            "--public-keys", exists=True, help="Public keys (`medzip keys export-public`)."
        ),
    ],
) -> None:
    """Check that the identity payload of .mzp blob(s) was signed by the node whose public
    keys are given (no secret key needed). Exits 1 unless every signature is valid."""
    try:
        trusted = PublicKeys.load(public_keys)
    except IdentityKeyError as exc:
        typer.echo(f"medzip codec: {exc}", err=True)
        raise typer.Exit(1) from None
    _run(inp, None, SUFFIX, "signature", functools.partial(_signature_one, trusted=trusted))


@codec_app.command("info")
def info(inp: InArg) -> None:
    """Describe .mzp blob(s) without decoding pixels (no dataset values)."""
    _run(inp, None, SUFFIX, "info", _info_one)
