"""The audit trail across node processes: the first rotates the file by size, the others
follow its rotations; no record is lost or torn."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from medzip_scp import audit

_FOLLOWER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from medzip_scp import audit

    audit.configure_audit(Path(sys.argv[1]), 4096, 100, rotates=False)
    for n in range(300):
        audit.record("store", "success", calling_ae="FOLLOWER", n=n)
        time.sleep(0.002)
    """
)


def test_records_of_every_process_survive_the_rotations(tmp_path: Path) -> None:
    trail = tmp_path / "audit" / "audit.jsonl"
    audit.configure_audit(trail, 4096, 100, rotates=True)  # this process: the node's first
    written = 0
    try:
        follower = subprocess.Popen([sys.executable, "-c", _FOLLOWER, str(trail)])
        deadline = time.monotonic() + 120
        while follower.poll() is None and time.monotonic() < deadline:
            audit.record("store", "success", calling_ae="FIRST", n=written)
            written += 1
            time.sleep(0.001)
        assert follower.wait(timeout=10) == 0
    finally:
        audit.close_audit()
    files = sorted(trail.parent.glob("audit.jsonl*"))
    assert len(files) > 3  # it rotated, several times, while both wrote
    by_file = {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in files}
    records = [r for lines in by_file.values() for r in lines]
    assert sorted(r["n"] for r in records if r["calling_ae"] == "FIRST") == list(range(written))
    assert sorted(r["n"] for r in records if r["calling_ae"] == "FOLLOWER") == list(range(300))
    # the follower reopened the file after each rotation (else all its lines sit in the
    # one file it first opened, renamed along)
    followed = [
        name for name, lines in by_file.items() if any(r["calling_ae"] == "FOLLOWER" for r in lines)
    ]
    assert len(followed) > 1
