"""Sandboxes: where one attempt of an agent runs. The port is `base.Sandbox`; the backends
are `process` (local processes, in bubblewrap when available) and `docker` (containers)."""

from __future__ import annotations

import socket

from kjob.config import Settings, config_file
from kjob.executor.sandbox.base import Launch, Outcome, OutputSink, Sandbox
from kjob.executor.sandbox.docker import DockerSandbox
from kjob.executor.sandbox.process import ProcessSandbox
from kjob.model.sizes import parse_size

__all__ = ["DockerSandbox", "Launch", "Outcome", "OutputSink", "ProcessSandbox", "Sandbox", "make_sandboxes"]


def make_sandboxes(settings: Settings) -> dict[str, Sandbox]:
    """The backends named in `settings.executor.sandboxes`, by name, not yet started.

    The caller starts each (`await sandbox.start()`, which raises ServerError when the backend
    cannot work on this node) and closes each at shutdown.
    """
    node = settings.node_name or socket.gethostname()
    makers = {
        "process": lambda: ProcessSandbox(
            require_isolation=settings.executor.require_isolation,
            hide=[settings.home, config_file()],  # tokens, the embedded database, credentials
            extra_binds=settings.executor.extra_binds,
            host_network_tenants=settings.executor.host_network_tenants,
            disk_bytes=parse_size(settings.executor.sandbox_disk, "executor.sandbox_disk"),
            uid_base=settings.executor.sandbox_uid_base,
        ),
        "docker": lambda: DockerSandbox(
            node, settings.executor.docker_url, host_network_tenants=settings.executor.host_network_tenants,
            disk_bytes=parse_size(settings.executor.sandbox_disk, "executor.sandbox_disk"),
        ),
    }
    return {name: makers[name]() for name in dict.fromkeys(settings.executor.sandboxes)}
