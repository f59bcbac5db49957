"""The Hugging Face hub, when it cannot be reached: answer from the local cache at once.

Offline, every hub client (transformers, datasets, huggingface_hub) retries each request
five times with backoff before giving up: half a minute, and five retry lines, before the
one clear error. `prefer_cache()` decides once per process whether the hub is reachable
(HF_HUB_OFFLINE set, else a TCP connect to the endpoint with a short timeout; behind a
proxy the hub is assumed reachable) and, when it is not, switches the clients to offline
mode, so a cached model or dataset still loads and a missing one fails in milliseconds.
"""

from __future__ import annotations

import os
import socket
import sys
from functools import cache
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@cache
def offline() -> bool:
    """True when the hub cannot be reached from here (decided once per process)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False  # a direct connect says nothing about the proxy's reach
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S):
            return False
    except OSError:
        return True


def prefer_cache() -> bool:
    """Put the hub clients in offline mode when the hub is unreachable; returns whether it is."""
    if not offline():
        return False
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    loaded = sys.modules.get("datasets.config")  # read from huggingface_hub when imported later
    if loaded is not None:
        loaded.HF_HUB_OFFLINE = True
    return True
