"""Configuration: defaults, TOML file, environment and flag precedence."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medzip_scp.cli.main import _settings, app
from medzip_scp.config import EXAMPLE_CONFIG, DuplicatePolicyValues, Settings, parse_destination


def test_defaults_are_the_quick_start_node(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("MEDZIP_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.node.ae_title, s.node.port) == ("MEDZIP", 11112)
    assert s.storage.resolved_database_url().startswith("sqlite:///")
    assert s.access.unknown_ae_hosts == ["127.0.0.1/32", "::1/128"]
    assert s.storage.duplicate_policy is DuplicatePolicyValues.REJECT


def test_example_config_is_valid_and_matches_defaults() -> None:
    from_example = Settings(**tomllib.loads(EXAMPLE_CONFIG))
    assert from_example.model_dump() == Settings().model_dump()


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "medzip.toml"
    config.write_text('[node]\nport = 2000\nae_title = "FROMFILE"\n[storage]\ndata_dir = "/x"\n')
    monkeypatch.setenv("MEDZIP_NODE__PORT", "3000")
    s = _settings(config)
    assert (s.node.port, s.node.ae_title, s.storage.data_dir) == (3000, "FROMFILE", Path("/x"))
    s = _settings(
        config, data_dir=tmp_path, port=4000, aet="FLAG", move_destinations=["VIEWER=10.0.0.5:104"]
    )
    assert (s.node.port, s.node.ae_title, s.storage.data_dir) == (4000, "FLAG", tmp_path)
    dest = s.move_destination("VIEWER")
    assert dest is not None and (dest.host, dest.port) == ("10.0.0.5", 104)


@pytest.mark.parametrize("bad", ["VIEWER", "VIEWER=host", "=h:1", "V=h:notaport"])
def test_bad_move_destination(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_destination(bad)


def test_bad_ae_title_rejected() -> None:
    with pytest.raises(ValueError):
        Settings(node={"ae_title": "THIS_TITLE_IS_TOO_LONG"})


def test_cli_config_example_and_keys(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["config", "example"])
    assert result.exit_code == 0 and "[access]" in result.output
    result = runner.invoke(app, ["keys", "show", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    key_text = (tmp_path / "keys" / "blob.key").read_text().strip()
    assert key_text not in result.output


def test_query_settings_name_a_known_character_set() -> None:
    s = Settings(query={"max_answers": 5, "character_set": " ISO 2022 IR 13\\ISO 2022 IR 87 "})
    assert (s.query.max_answers, s.query.character_set) == (5, "ISO 2022 IR 13\\ISO 2022 IR 87")
    assert Settings().query.character_set == "ISO_IR 192"
    for wrong in ("UTF-8", "", "ISO_IR 100\\", "ISO_IR 100\\\\ISO 2022 IR 87"):
        with pytest.raises(ValueError, match=r"\[query\] character_set"):
            Settings(query={"character_set": wrong})
    with pytest.raises(ValueError, match="max_answers"):
        Settings(query={"max_answers": 0})


def _one_line_error(args: list[str]) -> str:
    """Run ``medzip ARGS``, which must fail with one line on stderr; that line."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an exception
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def no_medzip_variables(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(__import__("os").environ):
        if key.startswith("MEDZIP_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[node\nport = 1\n", "is not valid TOML: Expected ']' at the end of a table declaration"),
        ('[node]\nport = 1\nport = "x"\n', "(at line 3, column"),
        ('[node]\nport = "abc"\n', "[node] port in {config}: Input should be a valid integer"),
        ("[node]\nportt = 104\n", "unknown key [node] portt in {config}"),
        ("[[access.peers]]\nae_title = 'CT'\nright = ['echo']\n", "[access] peers[0].right"),
        ("[nodes]\nport = 104\n", "unknown key nodes in {config}"),
    ],
)
def test_configuration_file_errors_are_one_line(
    tmp_path: Path, no_medzip_variables: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    config = tmp_path / "medzip.toml"
    config.write_text(text)
    line = _one_line_error(["config", "show", "--config", str(config)])
    assert line.startswith("medzip: ") and str(config) in line
    assert expected.format(config=config) in line


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MEDZIP_NODE_PORT", "104", "did you mean MEDZIP_NODE__PORT?"),
        ("MEDZIP_NODE__PORTT", "104", "did you mean MEDZIP_NODE__PORT?"),
        ("MEDZIP_DATABASE_URL", "sqlite://", "did you mean MEDZIP_STORAGE__DATABASE_URL?"),
        ("MEDZIP_NODE__PORT", "abc", "[node] port in environment variable MEDZIP_NODE__PORT"),
    ],
)
def test_environment_errors_name_the_variable(
    no_medzip_variables: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    no_medzip_variables.setenv(variable, value)
    line = _one_line_error(["config", "show"])
    assert variable in line and expected in line


def test_variables_that_are_not_settings_are_let_be(
    no_medzip_variables: pytest.MonkeyPatch,
) -> None:
    no_medzip_variables.setenv("MEDZIP_TEST_PG_URL", "postgresql+psycopg://x@h/db")
    no_medzip_variables.setenv("MEDZIP_STORAGE__DATABASE_URL", "sqlite://")
    assert CliRunner().invoke(app, ["config", "show"]).exit_code == 0


def test_an_invalid_password_is_not_shown(tmp_path: Path) -> None:
    config = tmp_path / "medzip.toml"
    config.write_text("[tls]\nprivate_key_password = 73318521\n")
    line = _one_line_error(["config", "show", "--config", str(config)])
    assert "[tls] private_key_password" in line and "73318521" not in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--move-destination", "VIEWER"], "--move-destination: a C-MOVE destination is"),
        (["--move-destination", "VIEWER=h:0"], "AET=HOST:PORT (e.g. VIEWER=10.0.0.5:11112)"),
        (["--aet", "A_TITLE_OF_20_CHARS_"], "--aet: AE title must be 1-16 characters"),
        (["--allow", "10.0.0.0/33"], "--allow: "),
    ],
)
def test_bad_flags_are_one_line(tmp_path: Path, flags: list[str], expected: str) -> None:
    line = _one_line_error(["serve", "--data-dir", str(tmp_path / "d"), *flags])
    assert expected in line
    assert not (tmp_path / "d").exists()
