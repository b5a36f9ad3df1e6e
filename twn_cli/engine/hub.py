"""Backbones named by a hub id: read from the local Hugging Face cache, or downloaded only if the hub answers.

Without a network, downloading retries each file for minutes before it fails. So before a hub id is loaded,
one connection to the hub is tried (a few seconds at most): when it fails, or HF_HUB_OFFLINE is set, a
cached copy is used and a missing one is an error at once.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from twn_cli.errors import TWNError

log = logging.getLogger(__name__)

# owner/name, or a bare name (gpt2): what the hub accepts as a repository id.
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
CONNECT_SECONDS = 5.0


def hub_load_options(source: str) -> dict:
    """Extra `from_pretrained` options for `source`: none for a local path, `local_files_only` when the hub
    cannot be used; a TWNError at once when the hub id can be neither downloaded nor found in the cache."""
    if Path(source).exists():
        return {}
    if not REPO_ID.fullmatch(source):
        raise TWNError(f"backbone '{source}' is neither an existing directory nor a hub id (owner/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise TWNError(f"backbone '{source}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                           "give a local directory, or download it first")
        return {"local_files_only": True}
    if hub_reachable(constants.ENDPOINT):
        return {}
    if cached:
        log.warning("the hub (%s) cannot be reached: loading '%s' from the local cache", constants.ENDPOINT, source)
        return {"local_files_only": True}
    raise TWNError(f"backbone '{source}' is not a local directory, not in the local Hugging Face cache, and the hub "
                   f"({constants.ENDPOINT}) cannot be reached to download it")


def hub_reachable(endpoint: str) -> bool:
    """Whether a connection to the hub's host opens within CONNECT_SECONDS (its name resolving first).
    Behind a proxy only a download can tell: then it is assumed to answer."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_SECONDS):
            return True
    except OSError:
        return False
