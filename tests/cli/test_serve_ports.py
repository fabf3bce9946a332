"""`kjob up`'s embedded NATS port: the one of last time, unless something took it meanwhile."""

from __future__ import annotations

import socket

from kjob.cli.serve import _saved_port
from kjob.embedded._process import port_is_free


def test_the_port_of_last_time_is_kept_while_it_is_free(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "nats.port").write_text(str(port))
    assert _saved_port(tmp_path / "nats.port", 4222) == port


def test_a_port_taken_since_last_time_moves_instead_of_failing_the_start(tmp_path, caplog):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        (tmp_path / "nats.port").write_text(str(taken))
        chosen = _saved_port(tmp_path / "nats.port", taken)
        assert chosen != taken and port_is_free(chosen)
    assert f"port {taken} used last time is taken" in caplog.text
