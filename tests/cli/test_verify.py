"""``medzip verify``: every blob decodes to the bytes that were received."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from medzip_scp.cli.main import app
from medzip_scp.index.models import Instance
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset, store


def test_verify_reports_intact_then_damaged(node: RunningNode, tmp_path: Path) -> None:
    for _ in range(3):
        assert store(node, ct_dataset()) == Status.SUCCESS
    args = [
        "verify",
        "--data-dir",
        str(node.settings.storage.data_dir),
    ]
    env = {"MEDZIP_STORAGE__DATABASE_URL": node.settings.storage.database_url}
    runner = CliRunner()
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "| 3 | 0 | 3 | 0 | 0 | 0 |" in result.output  # checked, sealed, OK, TAMPERED, ...

    with node.archive.sessions() as session:
        victim = session.scalars(select(Instance).order_by(Instance.id)).first()
        assert victim is not None
        path = node.archive.blobs._path(victim.blob_key)
        uid = victim.sop_instance_uid
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the sealed blob
    path.write_bytes(bytes(raw))
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 1
    assert "| 3 | 0 | 2 | 1 | 0 | 0 |" in result.output
    assert f"TAMPERED: {uid}: blob refused" in result.output
