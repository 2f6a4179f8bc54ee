"""README.md's commands, run exactly as printed.

Every line of a ```sh block is a command. The first block installs and starts the node, the
second installs the test dependencies and runs the suite (``.ci/run`` runs it verbatim, so
CI is its test), the rest are "Trying it". Those run with ``bash -c``, each line as printed,
in a fresh folder laid out like the checkout: ``checkout/.venv`` links to this venv and
``shared`` beside it to the real shared data (``../shared/data``), so the data folder
(``./medzip-data``) starts empty. A ``medzip serve`` line is started in the background and
waited for until "ready" (the node before it is stopped, as the README says), a line ending
in ``&`` keeps running until the test ends; every other line must exit 0 and its output is
checked by the tool it runs. The README uses the default port 11112 (and 11113 for the C-MOVE
destination): the test fails at once, naming the port, when something else holds it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from tests.data_paths import REPO_ROOT, SHARED_DATA

README = REPO_ROOT / "README.md"
CI_RUN = REPO_ROOT / ".ci" / "run"
DCMTK_TOOLS = ("echoscu", "storescu", "findscu", "getscu", "movescu", "storescp")
README_PORTS = (11112, 11113)  # the node's default port, the C-MOVE destination's
NODE_START_TIMEOUT = 120
COMMAND_TIMEOUT = 300
# pip is quick with its cache warm; a cold torch download takes longer
INSTALL_TIMEOUT = 1200


def sh_blocks() -> list[list[str]]:
    """The lines of every ```sh block of README.md, block by block."""
    blocks = re.findall(r"^```sh\n(.*?)^```$", README.read_text(), re.M | re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def install_command() -> str:
    return _only_line(sh_blocks()[0])


def suite_command() -> str:
    return _only_line(sh_blocks()[1])


def trying_it_commands() -> list[str]:
    return [line for block in sh_blocks()[2:] for line in block]


def _only_line(block: list[str]) -> str:
    assert len(block) == 1, f"expected one command in the block, found {block}"
    return block[0]


def _user_env() -> dict[str, str]:
    """The environment a user runs the README from: none of the suite's MEDZIP_ settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDZIP_")}


def _require_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            pytest.fail(
                f"port {port} is in use ({exc.strerror}); the README's commands need it: "
                "stop whatever listens there and run the test again",
                pytrace=False,
            )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group (a ``&`` line's job is in it too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
    """Seconds until the node's output says "ready"; fails with its output otherwise."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if any(line.startswith("ready") for line in log.read_text().splitlines()):
            return time.monotonic() - started
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    text = log.read_text()
    _stop(proc)
    pytest.fail(f"node did not say ready (exit {proc.returncode}):\n{text[-4000:]}")


def _wait_for_listener(port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on port {port} after the background command:\n{log.read_text()}")


@dataclass
class Session:
    """A user's folder and what the README's commands did in it so far."""

    cwd: Path
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    node: subprocess.Popen[bytes] | None = None
    # StudyInstanceUID -> instances sent by storescu lines, and their transfer syntaxes
    sent: Counter[str] = field(default_factory=Counter)
    syntaxes: dict[str, set[str]] = field(default_factory=dict)
    move_destination_folder: Path | None = None
    logs: int = 0

    def log_file(self) -> Path:
        self.logs += 1
        return self.cwd.parent / f"background-{self.logs}.log"

    def background(self, command: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.log_file()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(proc)
        return proc, log

    def run(self, command: str) -> str:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\nexit {result.returncode}:\n{output}"
        return output


def _note_sent(folder: Path, session: Session) -> None:
    """Count the DICOM files under ``folder`` (what storescu +sd sends) by study."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            study_uid = str(ds.StudyInstanceUID)
            session.sent[study_uid] += 1
            session.syntaxes.setdefault(study_uid, set()).add(ds.file_meta.TransferSyntaxUID)


def _syntaxes(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in files}


def _study_uid(command: str) -> str:
    match = re.search(r"StudyInstanceUID=([0-9.]+)", command)
    assert match, f"{command}: names no StudyInstanceUID to retrieve"
    return match.group(1)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()]


def _run_trying_it(command: str, session: Session) -> None:
    """Run one "Trying it" line as printed and check what it did, by the tool it runs."""
    for tool in DCMTK_TOOLS:
        assert not re.search(rf"(?<![/\w]){tool}\b", command), (
            f"{command}: call DCMTK's {tool} as /usr/bin/{tool} "
            f"(the venv's bin/ holds pynetdicom's {tool}, with other options)"
        )
    if re.search(r"\bmedzip serve\b", command):
        if session.node is not None:  # "stop the node (Ctrl-C) and start it again"
            _stop(session.node)
        session.node, log = session.background(command)
        _wait_for_ready(session.node, log, NODE_START_TIMEOUT)
    elif command.endswith("&"):
        _, log = session.background(command)
        assert "/usr/bin/storescp" in command, f"no check for the background command {command}"
        folder = re.search(r"-od (\S+)", command)
        port = re.search(r"(\d+) &$", command)
        assert folder and port, f"{command}: expected an output folder (-od) and a port"
        session.move_destination_folder = session.cwd / folder.group(1)
        _wait_for_listener(int(port.group(1)), log)
    elif "/usr/bin/echoscu " in command:
        session.run(command)
    elif "/usr/bin/storescu " in command:
        output = session.run(command)
        # DCMTK reports a refused or unsent file as an error line (E:/F:)
        assert not re.search(r"^[EF]:", output, re.M), f"{command}:\n{output}"
        _note_sent(session.cwd / command.split()[-1], session)
    elif "/usr/bin/findscu " in command:
        output = session.run(command)
        for study_uid in session.sent:  # DCMTK shows an odd-length UID with its padding
            listed = re.search(rf"\[{re.escape(study_uid)}[ \0]?\]", output)
            assert listed, f"{command}: {study_uid} not listed:\n{output}"
    elif "/usr/bin/getscu " in command:
        study_uid = _study_uid(command)
        assert study_uid in session.sent, f"{command}: {study_uid} is no study stored above"
        output = session.run(command)
        folder = re.search(r"-od (\S+)", command)
        assert folder, f"{command}: expected an output folder (-od)"
        got = _files(session.cwd / folder.group(1))
        assert len(got) == session.sent[study_uid], output
        if "+xs" in command:  # the README says: in the transfer syntax it arrived in
            assert _syntaxes(got) == session.syntaxes[study_uid]
    elif "/usr/bin/movescu " in command:
        study_uid = _study_uid(command)
        assert study_uid in session.sent, f"{command}: {study_uid} is no study stored above"
        assert session.move_destination_folder is not None, "no C-MOVE destination started"
        output = session.run(command)
        moved = _files(session.move_destination_folder)
        assert len(moved) == session.sent[study_uid], output
    elif re.search(r"\bmedzip verify$", command):
        output = session.run(command)
        stored = sum(session.sent.values())
        # checked, sealed identity (those compressed so far), OK, TAMPERED, KEY-MISSING, ...
        assert re.search(rf"\| {stored} \| \d+ \| {stored} \| 0 \| 0 \| 0 \|", output), output
    elif re.search(r"\bmedzip status$", command):
        output = session.run(command)
        stored = sum(session.sent.values())
        # the "all" row: instances, then one column per state, the last verification
        assert re.search(rf"^\| all \| {stored} \|", output, re.M), output
        assert "last verification: verify finished" in output and f"{stored} checked" in output
    elif re.search(r"\bmedzip codec encode\b", command):
        # the line ends in cmp of the decoded file with the original: exit 0 is bit-exact
        assert re.search(r"&& cmp \S+ \S+$", command), f"{command}: expected to end in a cmp"
        session.run(command)
    else:
        pytest.fail(f"test_readme.py has no check for the README command: {command}")


@pytest.fixture
def user_folder(tmp_path: Path) -> Iterator[Session]:
    """A fresh folder laid out like the checkout, the README's ports free."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DICOM is absent ({SHARED_DATA}); see ../shared/data/README.md")
    missing = [tool for tool in DCMTK_TOOLS if not (Path("/usr/bin") / tool).exists()]
    if missing:
        pytest.skip(f"DCMTK is not installed ({', '.join(missing)}): apt-get install dcmtk")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "medzip").exists():
        pytest.skip(f"the suite does not run from a venv with medzip installed ({venv})")
    for port in README_PORTS:
        _require_free(port)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(venv)
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    session = Session(cwd=checkout, env=_user_env())
    try:
        yield session
    finally:
        for proc in reversed(session.processes):
            _stop(proc)


def test_readme_lists_the_commands_it_documents() -> None:
    """Install, suite, then "Trying it": the layout the other tests here rely on."""
    blocks = sh_blocks()
    assert len(blocks) >= 3, blocks
    assert install_command().endswith(" && .venv/bin/medzip serve"), install_command()
    assert trying_it_commands()


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    assert suite_command() in CI_RUN.read_text().splitlines()


@pytest.mark.dcmtk
@pytest.mark.slow
def test_trying_it_works_as_printed(user_folder: Session) -> None:
    """After the README's first command (the venv exists: its last step, ``medzip serve``),
    every "Trying it" line, in order, on a fresh data folder."""
    start_node = install_command().rsplit(" && ", 1)[1]
    _run_trying_it(start_node, user_folder)
    assert (user_folder.cwd / "medzip-data" / "index.sqlite3").exists()
    for command in trying_it_commands():
        _run_trying_it(command, user_folder)


@pytest.mark.slow
def test_install_and_serve_as_printed(tmp_path: Path) -> None:
    """The README's first command in a fresh copy of the checkout's tracked files, until the
    node says "ready"; prints how long it took."""
    try:
        tracked = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "ls-files", "-z"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}): no tracked files to copy")
    _require_free(README_PORTS[0])
    copy = tmp_path / "checkout"
    for name in tracked.decode().split("\0"):
        if name and (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    session = Session(cwd=copy, env=_user_env())
    session.env.pop("PYTHONPATH", None)  # the fresh install must import its own copy
    proc, log = session.background(install_command())
    try:
        seconds = _wait_for_ready(proc, log, INSTALL_TIMEOUT)
        print(f"README install and serve: ready after {seconds:.0f} s")
    finally:
        _stop(proc)
        # the fresh venv holds about a GB (torch): do not keep it among pytest's tmp folders
        shutil.rmtree(copy / ".venv", ignore_errors=True)


def test_the_layout_lists_every_module() -> None:
    """README's Layout is true to the code: each module of the package has its line."""
    text = README.read_text()
    layout = text[text.index("## Layout") :]
    package = REPO_ROOT / "medzip_scp"
    missing = []
    for path in sorted(package.rglob("*.py")) + sorted(package.rglob("*.c")):
        if path.name == "__init__.py" and path.parent.name in (
            "cli",
            "dicom",
            "identity",
            "index",
            "net",
            "pipeline",
            "storage",
            "codec",
        ):
            continue  # an empty package marker: its folder has the line
        if not re.search(rf"^\s+{re.escape(path.name)}\s", layout, re.M):
            missing.append(str(path.relative_to(REPO_ROOT)))
    assert not missing, f"README's Layout lacks: {missing}"
