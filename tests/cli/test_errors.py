"""What a user sees when ``medzip`` cannot do what it was asked: one line on stderr naming
the file, key, folder, port or database (never its password) and what to do; no
traceback unless asked for with ``--debug``."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.exc import DatabaseError
from typer.testing import CliRunner

from medzip_scp.cli.main import app
from tests.cli.serve_helpers import user_env
from tests.helpers.node import free_port

REPO = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=user_env() | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``medzip ARGS``, which must fail with one line on stderr; that line."""
    result = _run(cwd, "-m", "medzip_scp.cli.main", *args, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_port_in_use_is_found_before_the_data_folder_is_made(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_line_error(tmp_path, "serve", "--port", str(port), "--data-dir", "d")
    assert f"cannot serve on 0.0.0.0:{port}: Address already in use" in line
    assert "--port" in line
    assert not (tmp_path / "d").exists()  # no folder, no index, no migration


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["db", "upgrade"],
        ["verify"],
        ["worker", "--once"],
        ["keys", "show"],
    ],
)
def test_a_data_folder_that_cannot_be_written(tmp_path: Path, command: list[str]) -> None:
    # A file where the folder's parent should be: no one, root included, can make the folder.
    (tmp_path / "file").write_text("")
    if command == ["serve"]:
        command = ["serve", "--port", str(free_port())]
    line = _one_line_error(tmp_path, *command, "--data-dir", "file/data")
    assert line.startswith("medzip: cannot write ") and ": Not a directory; " in line
    assert f"the data folder {tmp_path / 'file' / 'data'} must be a folder" in line
    assert "--data-dir" in line


def test_an_index_database_that_cannot_be_opened(tmp_path: Path) -> None:
    # The index a link into a folder that is not there: SQLite cannot create it.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.sqlite3").symlink_to(tmp_path / "gone" / "index.sqlite3")
    line = _one_line_error(tmp_path, "serve", "--port", str(free_port()), "--data-dir", "data")
    assert f"cannot write the index database {tmp_path / 'gone' / 'index.sqlite3'}" in line
    assert "unable to open database file" in line and f"{tmp_path / 'data'}" in line


@pytest.mark.parametrize("command", [["serve"], ["db", "upgrade"], ["db", "current"]])
def test_an_unreachable_database_is_named_without_its_password(
    tmp_path: Path, command: list[str]
) -> None:
    closed = free_port()
    url = f"postgresql+psycopg://medzip:s3cret@127.0.0.1:{closed}/medzip"
    if command == ["serve"]:
        command = ["serve", "--port", str(free_port())]
    line = _one_line_error(
        tmp_path, *command, "--data-dir", "d", env={"MEDZIP_STORAGE__DATABASE_URL": url}
    )
    assert "cannot reach the index database at postgresql+psycopg://medzip:***@127.0.0.1:" in line
    assert f"127.0.0.1:{closed}" in line and "Connection refused" in line
    assert "MEDZIP_STORAGE__DATABASE_URL" in line
    assert "s3cret" not in line


def test_alembic_reads_the_node_database_variable(tmp_path: Path) -> None:
    database = tmp_path / "index.sqlite3"
    alembic = ("-m", "alembic", "-c", str(REPO / "alembic.ini"), "upgrade", "head")
    result = _run(tmp_path, *alembic, env={"MEDZIP_STORAGE__DATABASE_URL": f"sqlite:///{database}"})
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()
    result = _run(tmp_path, *alembic)  # no URL at all
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "no database URL: set MEDZIP_STORAGE__DATABASE_URL" in result.stderr


def test_an_unexpected_error_is_one_line_unless_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.sqlite3").write_text("not a database")
    line = _one_line_error(tmp_path, "db", "current", "--data-dir", "data")
    assert line == (
        "medzip db: (sqlite3.DatabaseError) file is not a database (DatabaseError); "
        "run `medzip --debug db ...` for the traceback"
    )
    monkeypatch.chdir(tmp_path)
    for variable in [k for k in os.environ if k.startswith("MEDZIP_")]:
        monkeypatch.delenv(variable)
    result = CliRunner().invoke(app, ["--debug", "db", "current", "--data-dir", "data"])
    assert isinstance(result.exception, DatabaseError)  # raised on: a traceback
    monkeypatch.setenv("MEDZIP_DEBUG", "1")
    result = CliRunner().invoke(app, ["db", "current", "--data-dir", "data"])
    assert isinstance(result.exception, DatabaseError)
