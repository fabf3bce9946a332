"""`executor.processes` splits the node's `executor.concurrency`; its children get the node's
settings through their environment, above whatever their TOML file says."""

from __future__ import annotations

import os

from kjob.config import Settings
from kjob.node import concurrency_shares, settings_env


def test_the_processes_share_the_nodes_runs_in_flight():
    assert concurrency_shares(8, 1) == [8]
    assert concurrency_shares(8, 3) == [3, 3, 2]
    assert concurrency_shares(1, 2) == [1, 1]  # each process runs at least one


def test_a_child_process_reads_back_the_nodes_settings(monkeypatch, tmp_path):
    node = Settings(home=tmp_path, node_name="n1", nats_url="nats://a:1,nats://b:2", database_url="postgresql://x/y",
                    executor={"processes": 1, "concurrency": 3, "claim_lease_s": 7.5, "sandboxes": ["process"]},
                    quotas={"max_concurrent_runs": 4})
    (tmp_path / "config.toml").write_text("[executor]\nconcurrency = 99\nclaim_lease_s = 1.0\n")
    for key in list(os.environ):
        if key.startswith("KJOB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("KJOB_HOME", str(tmp_path))
    for key, value in settings_env(node).items():
        monkeypatch.setenv(key, value)
    assert Settings() == node
