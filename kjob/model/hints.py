"""Hints the CLI adds under a failed run: what its output suggests the user change. Pure.

The process sandbox has no network unless the job asks for one (`sandbox.network`, default
`none`), so a job that fetches a URL fails with a bare resolver or socket error; the hint
names the setting instead of leaving the user to guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: What resolvers, sockets, curl, wget, Python and Node print when there is no network.
_NO_NETWORK = re.compile(
    r"network is unreachable|network unreachable|could not resolve|temporary failure in name resolution"
    r"|name or service not known|no address associated|nodename nor servname|name resolution"
    r"|getaddrinfo|enotfound|eai_again|enetunreach|econnrefused|connection refused|failed to connect"
    r"|bad address|couldn't connect|unable to connect|no route to host",
    re.IGNORECASE,
)


def network_hint(network: str, texts: Iterable[str | None]) -> str | None:
    """A hint when a run of a job without network (`none`) failed to connect, else None."""
    if network != "none" or not any(t and _NO_NETWORK.search(t) for t in texts):
        return None
    return ("hint: the sandbox has no network (sandbox.network = none); set --network egress "
            "(`kjob update SLUG --set sandbox.network=egress`) to reach the internet")
