"""Hub ids that cannot be fetched fail at once, with the way out named (a local folder, or ``HF_HUB_OFFLINE=1``).

Without network, ``from_pretrained`` / ``snapshot_download`` of a Hub id retry for tens of seconds before failing.
The command line and the converter call :func:`hub_files_mode` before touching a Hub id: one TCP connection attempt
to the Hub endpoint (or the configured HTTPS proxy) decides whether the Hub is reachable; if it is not (or
``HF_HUB_OFFLINE`` is set), a repository already in the local Hugging Face cache is used from there, and anything
else raises :class:`HubUnavailableError` (an ``OSError``) saying so.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlsplit

__all__ = ["HubUnavailableError", "hub_files_mode", "is_offline_mode"]

_CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnavailableError(OSError):
    """A Hub id was given, the Hub cannot be reached (or offline mode is on) and the repository is not cached."""


def is_offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as set now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((value or "").upper() in _TRUE for value in values)


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _reachable(url: str) -> bool:
    """Whether a TCP connection to ``url``'s host (or to the HTTPS proxy, when one is configured) opens."""
    proxy = urllib.request.getproxies().get(urlsplit(url).scheme)
    parts = urlsplit(proxy if proxy and not urllib.request.proxy_bypass(urlsplit(url).hostname or "") else url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=_CONNECT_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def _cached(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id=repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    return True


def hub_files_mode(repo_id: str, what: str) -> bool:
    """Checks that the Hub id ``repo_id`` can be used now; returns ``local_files_only`` for loading it.

    ``False``: the Hub is reachable (load as usual). ``True``: offline mode is on or the Hub cannot be reached, and
    the repository is in the local cache (load from the cache only, without waiting on the network).

    Raises:
        HubUnavailableError: neither; the message names ``what`` (e.g. ``"--model"``), ``HF_HUB_OFFLINE=1`` and the
            local-folder alternative.
    """
    offline = is_offline_mode()
    endpoint = _endpoint()
    if not offline and _reachable(endpoint):
        return False
    if _cached(repo_id):
        return True
    reason = ("HF_HUB_OFFLINE is set" if offline
              else f"the Hugging Face Hub ({endpoint}) cannot be reached (no network?)")
    raise HubUnavailableError(
        f"{what} {repo_id!r} is not a local folder, so it is taken as a Hub id, but {reason} and it is not in the "
        "local Hugging Face cache. Pass a local folder instead, or download it once with network access (later runs "
        "can then use the cache without network: set HF_HUB_OFFLINE=1)."
    )
