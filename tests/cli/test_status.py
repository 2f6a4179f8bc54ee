"""``medzip status``: backlog, compression, bytes per modality, keys, models and the last
verification of a running node's archive, without a UID or a patient's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medzip_scp.cli.main import app
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset, store


def _status(node: RunningNode, *flags: str) -> str:
    args = ["status", "--data-dir", str(node.settings.storage.data_dir), *flags]
    env = {"MEDZIP_STORAGE__DATABASE_URL": node.settings.storage.database_url}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_status_follows_the_backlog_compression_and_verification(node: RunningNode) -> None:
    sent = [ct_dataset(PatientName="Status^Probe") for _ in range(3)]
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    before = json.loads(_status(node, "--json"))
    (ct,) = before["modalities"]
    assert ct["modality"] == "CT" and ct["by_state"] == {"stored": 3} and ct["backlog"] == 3
    assert ct["original_bytes"] > 0 and ct["stored_bytes"] > 0
    assert before["last_verification"] is None
    assert before["models"]["local-lm-v2"] is True
    assert before["blob_key_id"] == node.archive.blobs.key_id.hex()

    archive = node.archive
    assert compress_pending(archive, archive.compressing_codec()).compressed == 3
    verified = CliRunner().invoke(
        app,
        ["verify", "--data-dir", str(node.settings.storage.data_dir)],
        env={"MEDZIP_STORAGE__DATABASE_URL": node.settings.storage.database_url},
    )
    assert verified.exit_code == 0, verified.output

    after = json.loads(_status(node, "--json"))
    (ct,) = after["modalities"]
    assert ct["by_state"] == {"compressed": 3} and ct["backlog"] == 0
    assert ct["original_bytes"] == before["modalities"][0]["original_bytes"]
    assert ct["stored_bytes"] < ct["original_bytes"]
    last = after["last_verification"]
    assert (last["kind"], last["checked"], last["not_ok"], last["interrupted"]) == (
        "verify",
        3,
        0,
        False,
    )

    trail = (node.settings.storage.data_dir / "audit" / "audit.jsonl").read_text()
    (verify,) = [r for r in map(json.loads, trail.splitlines()) if r["action"] == "verify"]
    assert (verify["outcome"], verify["checked"], verify["not_ok"]) == ("success", 3, 0)
    assert verify["user"]  # who ran it

    table = _status(node)
    assert "| CT | 3 | 0 | 3 |" in table  # modality, instances, stored, compressed
    assert "last verification: verify finished" in table and "3 checked, 0 not OK" in table
    for text in (table, json.dumps(after)):
        assert "Status^Probe" not in text
        assert not any(ds.SOPInstanceUID in text for ds in sent)


def test_readiness_names_what_keeps_the_node_from_serving(
    node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = node.archive
    assert archive.health_problems() == []
    monkeypatch.setattr(archive.blobs, "root", tmp_path / "gone")
    assert archive.health_problems() == [f"blob folder {tmp_path / 'gone'} is not writable"]

    def index_away() -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(archive, "read_sessions", index_away)
    assert "the index does not answer (OSError)" in archive.health_problems()
