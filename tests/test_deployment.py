"""The deployment files work as written: the Dockerfile passes hadolint, deploy.yaml is valid
Kubernetes, the compose file and the systemd unit hold together, and every setting they give
(environment, mounted configuration) is one the node knows."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from medzip_scp.config import Settings
from tests.data_paths import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def _environment_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("MEDZIP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_dockerfile_passes_hadolint_and_sets_only_known_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    linted = _run(str(BIN / "hadolint"), "docker/Dockerfile")
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = (DOCKER / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "whl/cpu" in text  # never the CUDA build
    run_stage = text.split("FROM python:3.11-slim\n", 1)[1]
    assert "build-essential" not in run_stage  # no compiler where it runs
    assert re.search(r"^USER 10001", run_stage, re.M)
    env = dict(re.findall(r"(MEDZIP_\w+)=(\S+)", run_stage))
    settings = _environment_settings(env, monkeypatch)
    assert settings.storage.data_dir == Path("/data")
    assert settings.storage.resolved_key_file() == Path("/keys/blob.key")
    assert settings.monitoring.port == 9100 and settings.monitoring.bind == "0.0.0.0"
    healthcheck = re.search(r"HEALTHCHECK .*\n.*(http://127\.0\.0\.1:(\d+)/healthz)", text)
    assert healthcheck and int(healthcheck.group(2)) == settings.monitoring.port


def _documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "deploy.yaml").read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_deploy_yaml_is_valid_kubernetes_with_probes_secrets_and_shards() -> None:
    validated = _run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", "deploy.yaml")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    docs = _documents()
    node = docs["Deployment/medzip-node"]["spec"]
    assert node["replicas"] == 1 and node["strategy"]["type"] == "Recreate"
    (container,) = node["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]  # migrations before the port opens: no kill loop
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (url,) = container["env"]
    assert url["valueFrom"]["secretKeyRef"]["name"] == "medzip-database"
    volumes = {v["name"]: v for v in node["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "medzip-keys"
    assert volumes["blobs"]["persistentVolumeClaim"]["claimName"] == "medzip-blobs"
    assert docs["PersistentVolumeClaim/medzip-blobs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    workers = docs["StatefulSet/medzip-worker"]["spec"]
    (command,) = workers["template"]["spec"]["containers"][0]["args"]
    shards = re.search(r'--shard "\$\{HOSTNAME##\*-\}/(\d+)"', command)
    assert shards and int(shards.group(1)) == workers["replicas"]
    config = tomllib.loads(docs["ConfigMap/medzip-config"]["data"]["medzip.toml"])
    assert Settings(**config).pipeline.compress is False  # the workers compress


def test_compose_file_keeps_keys_apart_and_its_configuration_is_valid() -> None:
    checked = _run(
        str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
        "docker/compose.yaml",
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "node", "worker"}
    for name in ("node", "worker"):
        mounts = {m.split(":")[1]: m.split(":")[0] for m in services[name]["volumes"]}
        assert mounts["/data"] == "blobs" and mounts["/keys"] == "keys"
        config = DOCKER / mounts["/etc/medzip/medzip.toml"]
        assert config.is_file()
        url = services[name]["environment"]["MEDZIP_STORAGE__DATABASE_URL"]
        assert "${MEDZIP_DB_PASSWORD}" in url  # no password in the file
    assert services["worker"]["healthcheck"] == {"disable": True}
    assert set(compose["volumes"]) == {"pgdata", "blobs", "keys"}
    settings = Settings(**tomllib.loads((DOCKER / "medzip.toml").read_text()))
    assert settings.pipeline.compress is False and settings.monitoring.port == 9100


def test_systemd_unit_verifies_and_starts_a_real_command(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DOCKER / "medzip.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert exec_start[0] == "/opt/medzip/bin/medzip"
    # keys and data in directories systemd gives the service user; the config stays root's
    assert re.search(r"^StateDirectory=medzip medzip-keys$", unit, re.M)
    assert "ConfigurationDirectory" not in unit
    keys = re.findall(r"^Environment=MEDZIP_\w+__KEY_FILE=(\S+)$", unit, re.M)
    assert keys and all(k.startswith("/var/lib/medzip-keys/") for k in keys)
    # the same unit with this installation's medzip, which systemd checks is executable
    local = tmp_path / "medzip.service"
    local.write_text(unit.replace(exec_start[0], str(BIN / "medzip")))
    verified = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, timeout=120
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    args = exec_start[1].split()
    helped = _run(str(BIN / "medzip"), args[0], "--help")
    assert helped.returncode == 0 and all(a in helped.stdout for a in args if a[:2] == "--")
