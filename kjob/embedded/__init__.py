"""Real servers run as children of kjob: `kjob up` and the tests use them when no URL is configured."""

from kjob.embedded._process import free_port
from kjob.embedded.nats import EmbeddedNats
from kjob.embedded.postgres import EmbeddedPostgres

__all__ = ["EmbeddedNats", "EmbeddedPostgres", "free_port"]
