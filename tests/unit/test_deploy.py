"""Deployment files, validated offline (no Docker engine or cluster here): the compose file by a
real Compose implementation, the Kubernetes manifests by kubernetes-validate --strict, and the
references between them, the Dockerfile and the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import compose
import pytest
import yaml

from _support import REPO

# The PyPI wrapper's entry point drops the exit status: call the Compose binary itself.
COMPOSE = Path(compose.__file__).parent / "docker-compose"
SECRETS = {"TOKENRELAY_INTERNAL_SECRET": "s", "TOKENRELAY_API_KEY": "k"}


def _compose(*args: str, env: dict[str, str], file: Path = REPO / "docker-compose.yml") -> Any:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    return subprocess.run(
        [str(COMPOSE), "-f", str(file), *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=REPO,
        timeout=60,
    )


@pytest.mark.parametrize("profile", ["gpu", "cpu", "otel"])
def test_compose_file_is_valid_for_every_profile(profile: str) -> None:
    done = _compose("--profile", profile, "config", "-q", env=SECRETS)
    assert done.returncode == 0, done.stderr


def test_compose_refuses_to_run_without_the_secrets_and_catches_mistakes(tmp_path: Path) -> None:
    for missing in SECRETS:
        env = {k: v for k, v in SECRETS.items() if k != missing}
        done = _compose("--profile", "gpu", "config", "-q", env=env)
        assert done.returncode != 0 and missing in done.stderr
    broken = tmp_path / "docker-compose.yml"
    text = (REPO / "docker-compose.yml").read_text()
    broken.write_text(text.replace("- weights:/root", "- wieghts:/root"))
    assert _compose("--profile", "gpu", "config", "-q", env=SECRETS, file=broken).returncode != 0


def test_compose_keeps_inference_and_logic_private() -> None:
    done = _compose("--profile", "gpu", "--profile", "cpu", "config", env=SECRETS)
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert [name for name, s in services.items() if s.get("ports")] == ["edge"]
    for name in ("triton", "triton-cpu", "triton-embed", "qdrant", "orchestrator"):
        assert set(services[name]["networks"]) == {"internal"}, name
    assert config["networks"]["internal"]["internal"] is True
    models = next(v for v in services["triton"]["volumes"] if v["target"] == "/models")
    assert models["read_only"] is True
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    for name in ("triton", "triton-cpu"):
        assert "health/ready" in " ".join(services[name]["healthcheck"]["test"])


def test_dockerfile_references_exist() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), source
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    compose_file = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    targets = {compose_file["x-relay"]["build"]["target"]}
    targets.add(compose_file["services"]["triton-cpu"]["build"]["target"])
    assert targets <= stages
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    commands = set(re.findall(r'^CMD \["([\w-]+)"', dockerfile, re.MULTILINE))
    commands |= {"tokenrelay-orchestrator", "tokenrelay-edge"}
    assert commands <= set(scripts)
    for config in ("tokenrelay.gpu.toml", "tokenrelay.cpu.toml"):
        assert (REPO / "deploy" / config).exists()


def test_kubernetes_manifests_validate_strictly_and_match_the_repository() -> None:
    manifests = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, manifests)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    documents = [d for m in manifests for d in yaml.safe_load_all(m.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    for needed in [
        ("Deployment", "triton"),
        ("Deployment", "orchestrator"),
        ("Deployment", "edge"),
        ("Service", "triton"),
        ("Deployment", "triton-embed"),
        ("StatefulSet", "qdrant"),
        ("Service", "qdrant"),
        ("PodDisruptionBudget", "edge"),
        ("HorizontalPodAutoscaler", "edge"),
        ("ConfigMap", "tokenrelay"),
        ("ConfigMap", "triton-models"),
    ]:
        assert needed in kinds, needed
    config_maps = {d["metadata"]["name"]: d["data"] for d in documents if d["kind"] == "ConfigMap"}
    assert (
        config_maps["tokenrelay"]["tokenrelay.toml"]
        == (REPO / "deploy" / "tokenrelay.gpu.toml").read_text()
    )
    vllm = REPO / "triton_models" / "smollm2_vllm"
    assert config_maps["triton-models"]["config.pbtxt"] == (vllm / "config.pbtxt").read_text()
    assert config_maps["triton-models"]["model.json"] == (vllm / "1" / "model.json").read_text()
    triton = next(
        d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "triton"
    )
    container = triton["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    shm = next(v for v in triton["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_the_relays_probes_go_to_the_ports_its_configuration_serves_them_on() -> None:
    # A probe on a port nothing answers fails every pod; on the API port it waits behind streams.
    documents = [
        d
        for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / "relay.yaml").read_text())
        if d and d["kind"] == "Deployment"
    ]
    config = tomllib.loads((REPO / "deploy" / "tokenrelay.gpu.toml").read_text())
    compose_file = (REPO / "docker-compose.yml").read_text()
    for deployment in documents:
        service = deployment["metadata"]["name"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        health = int(config[service]["health_listen"].rsplit(":", 1)[1])
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert ports[get["port"]] == health, (service, probe)
            assert get["path"] == {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}[probe]
        assert f"http://127.0.0.1:{health}/healthz" in compose_file, service
    cpu = tomllib.loads((REPO / "deploy" / "tokenrelay.cpu.toml").read_text())
    for service in ("orchestrator", "edge"):
        assert cpu[service]["health_listen"] == config[service]["health_listen"]
