"""The deployment files: docker-compose.yml has the stack the docs promise and configures kjob
with settings kjob accepts; the dashboard and alert rules query only metrics kjob exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kjob.model.agent_report import Usage
from kjob.config import ROLES, Settings
from kjob.model.run import Run, RunStatus
from kjob.store.database import normalize_url
from kjob.telemetry import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICES = {"nats-1", "nats-2", "nats-3", "postgres", "sched-1", "sched-2", "prometheus", "grafana"}
METRIC = re.compile(r"\bkjob_[a-z0-9_]+")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def substitute(value: str) -> str:
    """Compose's `${NAME:-default}` with the environment empty, as on a fresh machine."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def test_compose_runs_two_scheduler_nodes_on_a_three_node_jetstream_cluster_and_postgres(compose, monkeypatch):
    services = compose["services"]
    assert SERVICES <= services.keys()
    nats = ["nats-1", "nats-2", "nats-3"]
    for name in nats:
        args = services[name]["command"]
        assert "-js" in args and args[args.index("--name") + 1] == name
        routes = args[args.index("--routes") + 1].split(",")
        assert sorted(routes) == [f"nats://{n}:6222" for n in nats]
    for node in ("sched-1", "sched-2"):
        service = services[node]
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["command"][0] == "server"
        assert set(service["command"][service["command"].index("--roles") + 1].split(",")) == set(ROLES)
        assert {"nats-1", "nats-2", "nats-3", "postgres"} <= service["depends_on"].keys()
        env = {k: substitute(str(v)) for k, v in service["environment"].items()}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # what the node would start with: kjob accepts every variable
        assert settings.node_name == node
        assert settings.nats_url.split(",") == [f"nats://{n}:4222" for n in nats]
        assert settings.stream_replicas == 3
        assert settings.log_format == "json"
        assert "@postgres:5432/kjob" in normalize_url(settings.database_url)
        assert str(settings.port) in service["ports"][0].split(":")[-1]
    assert services["sched-1"]["ports"] != services["sched-2"]["ports"]


def test_compose_provisions_prometheus_with_the_alerts_and_grafana_with_the_dashboard(compose):
    services = compose["services"]
    prometheus_dir = mounts(services["prometheus"])["/etc/prometheus"]
    config = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    assert all((prometheus_dir / rules).is_file() for rules in config["rule_files"])
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert sorted(job["static_configs"][0]["targets"]) == ["sched-1:8742", "sched-2:8742"]

    grafana = mounts(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "kjob.yml").read_text())["providers"]
    dashboards = grafana[provider["options"]["path"]]
    dashboard = json.loads((dashboards / "kjob.json").read_text())
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert used == {source["uid"]}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name kjob's /metrics shows once each recording function has been called."""
    fresh = metrics.Metrics()
    previous = metrics.install(fresh)
    try:
        slot = datetime.now(timezone.utc)
        run = Run(id="r", job_id="00000000-0000-0000-0000-000000000001", tenant="t", slug="s", slot=slot,
                  trigger="schedule", status="succeeded", attempt=1, started_at=slot, finished_at=slot)
        metrics.run_published(slot, "schedule")
        metrics.run_claimed(run, previous_lost=True)
        metrics.attempt_finished(run)
        metrics.attempt_finished(run.model_copy(update={"status": RunStatus.retrying}))
        metrics.slots_missed("overlap")
        metrics.job_skipped("unreadable")
        metrics.delivery_attempt("delivered")
        metrics.delivery_failed("rejected")
        metrics.leader_changed("n", True)
        metrics.watch_executor("n", lambda: 1, 8)
        metrics.consumer_state("kjob-executor", 1, 2, 3)
        metrics.agent_usage("t", "s", "claude", Usage(tokens_in=3, tokens_out=2, cost_usd=0.01, turns=1))
        text = fresh.render()[0].decode()
    finally:
        metrics.install(previous)
    families = {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}
    # EXPORTED (the documented list) is exactly what the exporter shows
    assert {n.removesuffix("_total") for n in metrics.EXPORTED} == set(families)
    return {name for samples in families.values() for name in samples}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kjob.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules() -> dict[str, str]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def test_every_dashboard_query_names_only_exported_metrics(exported):
    queries = dashboard_queries()
    assert queries
    for expr in queries:
        named = set(METRIC.findall(expr))
        assert named, f"query names no kjob metric: {expr}"
        assert named <= exported, f"{sorted(named - exported)} not exported; query: {expr}"
    used = {m for expr in queries for m in METRIC.findall(expr)}
    # the panels the operators were promised: fire lag, runs by status, failures, delivery, leader
    assert {"kjob_fire_lag_published_seconds_bucket", "kjob_runs_total", "kjob_delivery_attempts_total",
            "kjob_ticker_leader"} <= used


def test_every_alert_rule_names_only_exported_metrics(exported):
    rules = alert_rules()
    assert {"KjobNoTickerLeader", "KjobFireLagHigh", "KjobRunFailureStreak", "KjobRelayFailing"} <= rules.keys()
    for name, expr in rules.items():
        named = set(METRIC.findall(expr))
        assert named and named <= exported, f"{name}: {sorted(named - exported) or 'no kjob metric'}"


def test_units_and_install_script_agree_on_the_install_layout():
    env_files, commands = set(), []
    for unit in (DEPLOY / "systemd").glob("*.service"):
        for line in unit.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "EnvironmentFile":
                env_files.add(value.lstrip("-"))
            if key == "ExecStart":
                commands.append(value.split()[0])
    assert env_files == {"/etc/koder/scheduler/kjob.env", "/etc/koder/scheduler/nats.env"}
    assert sorted(commands) == ["/opt/koder/scheduler/venv/bin/kjob", "/opt/koder/scheduler/venv/bin/nats-server"]
    script = DEPLOY / "install.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "PREFIX=${KJOB_PREFIX:-/opt/koder/scheduler}" in text and "ETC=${KJOB_ETC:-/etc/koder/scheduler}" in text
