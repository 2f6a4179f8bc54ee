"""A missing or wrong blob key is refused, never silently replaced by a new one: two stores
acknowledged under a new key were unreadable once the real key was restored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete
from typer.testing import CliRunner

from medzip_scp.archive import Archive
from medzip_scp.cli.main import app
from medzip_scp.index.models import Instance, Patient, Series, Study
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from tests.helpers.node import RunningNode, free_port
from tests.helpers.scu import ct_dataset, store


@pytest.fixture
def keyless_archive(node: RunningNode, tmp_path: Path) -> tuple[Path, str, dict[str, str]]:
    """An archive holding a blob, whose key file was moved away; returns the data folder,
    the id of the key its blobs need, and the environment naming its database."""
    assert store(node, ct_dataset()) == Status.SUCCESS
    key_file = node.settings.storage.resolved_key_file()
    key_id = node.archive.blobs._key.key_id.hex()
    key_file.rename(tmp_path / "backup.key")
    env = {"MEDZIP_STORAGE__DATABASE_URL": node.settings.storage.database_url}
    return node.settings.storage.data_dir, key_id, env


@pytest.mark.parametrize("command", [["verify"], ["keys", "show"], ["worker", "--once"]])
def test_commands_refuse_an_archive_without_its_key(
    keyless_archive: tuple[Path, str, dict[str, str]], command: list[str]
) -> None:
    data_dir, key_id, env = keyless_archive
    result = CliRunner().invoke(app, [*command, "--data-dir", str(data_dir)], env=env)
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1, result.output  # one line, no traceback
    assert key_id in message[0] and str(data_dir / "keys" / "blob.key") in message[0]
    assert not (data_dir / "keys" / "blob.key").exists()  # no new key was made


def test_serve_refuses_to_start_without_its_key(
    keyless_archive: tuple[Path, str, dict[str, str]],
) -> None:
    data_dir, key_id, env = keyless_archive
    result = subprocess.run(
        [sys.executable, "-m", "medzip_scp.cli.main", "serve", "--data-dir", str(data_dir)]
        + ["--port", str(free_port())],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"key id {key_id}" in result.stderr and "ready" not in result.stdout
    assert not (data_dir / "keys" / "blob.key").exists()


def test_no_identity_key_is_made_for_sealed_blobs_the_index_lost(node: RunningNode) -> None:
    """An index lost (or rebuilt without the identity key) names no sealed instance, but
    the blob store holds them: a new identity key would seal new instances with a key that
    the old one, once restored, replaces."""
    assert store(node, ct_dataset()) == Status.SUCCESS
    assert compress_pending(node.archive, node.archive.compressing_codec()).compressed == 1
    key_file = node.settings.identity.resolved_key_file(node.settings.storage.data_dir)
    key_file.unlink()
    with node.archive.sessions() as session:
        for table in (Instance, Series, Study, Patient):
            session.execute(delete(table))
        session.commit()
    env = {"MEDZIP_STORAGE__DATABASE_URL": node.settings.storage.database_url}
    data_dir = str(node.settings.storage.data_dir)
    result = CliRunner().invoke(app, ["keys", "show", "--data-dir", data_dir], env=env)
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"medzip: identity key file {key_file} is missing, but the archive")
    assert not key_file.exists()
    assert Archive.open(node.settings, need_identity=False).identity is None
    assert not key_file.exists()
