"""The network probe behind every loader: pretrained files missing from the local caches fail
within seconds, with a download hint, when the hub is unreachable (instead of retrying downloads
for minutes)."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from huggingface_hub import constants as hf_constants

PROBE_TIMEOUT_S = 2.0
_TRUE = {"1", "ON", "YES", "TRUE"}


class OfflineWeightsError(RuntimeError):
    """Pretrained weights are not cached locally and cannot be downloaded now."""


def hub_address() -> tuple[str, int]:
    """(host, port) of the Hugging Face hub endpoint."""
    return url_address(hf_constants.ENDPOINT)


def url_address(url: str) -> tuple[str, int]:
    """(host, port) of a URL (default ports 80 / 443)."""
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)


def ensure_online(problem: str, hint: str, address: tuple[str, int]) -> None:
    """Return if ``address`` answers within PROBE_TIMEOUT_S, else raise OfflineWeightsError.

    $XCLIP_PROBE_HOST (host:port) overrides the address, an https proxy replaces it (that is
    what downloads would connect to), and HF_HUB_OFFLINE / XCLIP_OFFLINE skip the probe.
    """
    if any(os.environ.get(k, "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "XCLIP_OFFLINE")):
        reason = "offline mode is set (HF_HUB_OFFLINE or XCLIP_OFFLINE)"
    else:
        override = os.environ.get("XCLIP_PROBE_HOST")
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
        if override:
            host, _, port = override.rpartition(":")
            if not (host and port.isdigit()):
                raise ValueError(f"XCLIP_PROBE_HOST must be host:port, got {override!r}")
            address = (host, int(port))
        elif proxy:
            address = url_address(proxy)
        if reachable(address):
            return
        reason = f"{address[0]}:{address[1]} is unreachable"
    raise OfflineWeightsError(f"{problem}, and {reason}.\n{hint}")


def reachable(address: tuple[str, int]) -> bool:
    """TCP connect within PROBE_TIMEOUT_S; run in a thread so slow DNS cannot stretch it."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])
