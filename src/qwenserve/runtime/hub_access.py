"""Whether the Hugging Face hub can serve weights right now, asked before loading from it.

With ``--weights hub`` on a machine without internet, diffusers and huggingface_hub retry and
wait on the network for a long time before failing with an error that does not say what to do.
A short probe of the endpoint first turns that into one clear line: set ``HF_HUB_OFFLINE=1``
to load from the local cache. In offline mode a repo missing from the cache is named, with the
cache folder, instead of surfacing as a file-not-found deep inside diffusers.

The hub's own settings (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE``) are
read from ``huggingface_hub.constants``, exactly as the libraries that do the loading read them.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from qwenserve.errors import InferenceError

PROBE_TIMEOUT_S = 5.0
"""Connect and first-byte limit of the probe: a hub that answers at all answers in far less."""

OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to load from the local Hugging Face cache"


@dataclass(frozen=True)
class HubSettings:
    """Where the hub is, whether to use it at all, and where its files are cached."""

    endpoint: str
    offline: bool
    cache_dir: Path

    @classmethod
    def current(cls) -> HubSettings:
        from huggingface_hub import constants

        return cls(
            endpoint=constants.ENDPOINT.rstrip("/"),
            offline=bool(constants.HF_HUB_OFFLINE),
            cache_dir=Path(constants.HF_HUB_CACHE),
        )


def probe_endpoint(endpoint: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Return when ``endpoint`` answers an HTTP request (any status) within ``timeout_s``.

    Raises InferenceError saying it cannot be reached and to set ``HF_HUB_OFFLINE=1``: refused,
    unresolvable, silent (accepts but never answers) or a broken TLS handshake alike.
    """
    request = urllib.request.Request(endpoint + "/", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # an answer, even an error status, means the hub is there
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise InferenceError(
            f"cannot reach {endpoint} ({_describe(reason)}); {OFFLINE_HINT}"
        ) from error


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "no answer in time"
    text = str(reason).strip()
    return text.splitlines()[0][:200] if text else type(reason).__name__


def require_cached(repo_id: str, cache_dir: Path, filename: str = "model_index.json") -> None:
    """Raise InferenceError naming ``repo_id`` and ``cache_dir`` unless ``filename`` of the
    repo is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str):
        raise InferenceError(
            f"{repo_id} is not in the Hugging Face cache {cache_dir} and HF_HUB_OFFLINE=1 "
            f"forbids downloading it; download it on a connected machine (hf download "
            f"{repo_id}) and copy the cache, or point --weights at a weights folder"
        )


def check_hub_reachable(settings: HubSettings | None = None) -> None:
    """At startup: online, the endpoint must answer (InferenceError otherwise); offline, no
    check (each repo is checked against the cache when it is loaded)."""
    settings = settings or HubSettings.current()
    if not settings.offline:
        probe_endpoint(settings.endpoint)


def require_hub_repo(
    repo_id: str, filename: str = "model_index.json", settings: HubSettings | None = None
) -> None:
    """Before loading ``repo_id`` from the hub: in the cache when offline, else reachable."""
    settings = settings or HubSettings.current()
    if settings.offline:
        require_cached(repo_id, settings.cache_dir, filename)
    else:
        probe_endpoint(settings.endpoint)
