"""The D-Bus service `dev.koder.scheduler` (RFC-001 section 8; docs/dbus.md).

Every method call goes through the node's own HTTP API with the caller's token, so D-Bus
callers get exactly the roles, tenancy and validation of `/v1`.
"""

from kjob.dbus.service import BUS_NAME, INTERFACE, OBJECT_PATH, start

__all__ = ["BUS_NAME", "INTERFACE", "OBJECT_PATH", "start"]
