"""The real agent CLIs (installed by .ci/agents.sh, pinned and cached) and a model API on loopback."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path
from typing import Iterator

import pytest
import json

from tests.support.modelapi import ModelAPI, Reply

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    """The directory holding `claude` and `codex`; installing them if this machine has not yet."""
    out = subprocess.run(["bash", str(REPO / ".ci" / "agents.sh")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f".ci/agents.sh failed: {out.stderr[-2000:]}"
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def model_api() -> Iterator[ModelAPI]:
    with ModelAPI(default=Reply.answer("nothing scripted")) as api:
        yield api


@pytest.fixture
def agents_file(tmp_path: Path, agent_bin: Path, model_api: ModelAPI) -> Path:
    """The packaged claude and codex entries, with the CLIs by absolute path and the endpoint
    on the test's model API: what an operator's own agents file does for their endpoint."""
    import tomllib
    from importlib import resources

    packaged = tomllib.loads(resources.files("kjob").joinpath("agents.toml").read_text())["agents"]
    claude = {**packaged["claude"], "base_url": model_api.url}
    claude["command"] = [str(agent_bin / "claude"), *claude["command"][1:]]
    codex = {**packaged["codex"], "base_url": f"{model_api.url}/v1", "model": "gpt-5-codex",
             "price": {"input": 1.25, "output": 10.0}}
    codex["command"] = [str(agent_bin / "codex"), *codex["command"][1:]]
    llm = {**packaged["llm"], "base_url": f"{model_api.url}/v1", "model": "gpt-4o-mini",
           "price": {"input": 0.15, "output": 0.6}}
    # The venv's interpreter may live where the sandbox's uid cannot go (pyenv under /root):
    # the system Python of the same minor version runs llm from the venv's site-packages.
    llm["command"] = ["/usr/bin/python3", "-m", "llm", *llm["command"][1:]]
    llm["env"] = {"PYTHONPATH": sysconfig.get_path("purelib")}
    path = tmp_path / "agents.toml"
    entries = (("claude", claude), ("codex", codex), ("llm", llm))
    path.write_text("".join(_table(f"agents.{name}", entry) for name, entry in entries))
    return path


def _table(name: str, entry: dict) -> str:
    """One TOML table; JSON's strings, numbers and arrays are TOML's too."""
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)
    return f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in entry.items()) + "\n"
