"""The image classifier behind the output and input checks: a one-method interface, loaded by
name so an operator can plug in another (``NSFW_CLASSIFIER=package.module:factory``).

The default is the NudeNet adapter (``policy/nudenet.py``), an optional extra
(``pip install 'qwenserve[nsfw]'``, AGPL-3.0). A classifier works on PIL images, on a CPU, with
no torch: it runs in the worker next to the engine, off the denoising path.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from qwenserve.policy import PolicyConfigError

if TYPE_CHECKING:
    from PIL import Image

    from qwenserve.config import Settings

log = logging.getLogger("qwenserve.policy")

DEFAULT_CLASSIFIER = "qwenserve.policy.nudenet:NudeNetClassifier"


@runtime_checkable
class ImageClassifier(Protocol):
    """Scores how likely an image breaks the policy (the default: shows nudity)."""

    def score(self, image: Image.Image) -> float:
        """A score in [0, 1]; the policy blocks at or above its threshold. Must be safe to
        call from several threads at once (each worker calls it from its own)."""
        ...


def load_classifier(spec: str) -> ImageClassifier:
    """Import ``module:callable`` and call it with no arguments for the classifier.

    Raises:
        PolicyConfigError: the name is malformed, cannot be imported, or makes no classifier.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PolicyConfigError(f"nsfw_classifier {spec!r}: expected 'package.module:callable'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise PolicyConfigError(f"nsfw_classifier {spec!r} cannot be loaded: {error}") from None
    classifier = factory()
    if not isinstance(classifier, ImageClassifier):
        raise PolicyConfigError(f"nsfw_classifier {spec!r} made no classifier (no score method)")
    return classifier


@dataclass(frozen=True)
class ImageCheck:
    """A classifier and the threshold at which it blocks."""

    classifier: ImageClassifier
    threshold: float

    def blocks(self, image: Image.Image, *, what: str) -> bool:
        """Whether ``image`` is blocked; logs its score and the time it took, as ``what``
        (e.g. ``job <id> output``: the request id where the caller knows it)."""
        started = time.perf_counter()
        score = float(self.classifier.score(image))
        blocked = score >= self.threshold
        log.log(
            logging.WARNING if blocked else logging.DEBUG,
            "%s image scored %.3f (threshold %.2f) in %.1f ms%s",
            what,
            score,
            self.threshold,
            (time.perf_counter() - started) * 1000,
            ": blocked by the content policy" if blocked else "",
        )
        return blocked


def image_check(settings: Settings, *, inputs: bool) -> ImageCheck | None:
    """The check the worker runs on outputs (``inputs=False``) or on edit inputs, or None when
    ``settings.content_policy`` does not ask for it.

    Raises:
        PolicyConfigError: the classifier cannot be loaded.
    """
    wanted = settings.checks_inputs if inputs else settings.checks_outputs
    if not wanted:
        return None
    return ImageCheck(_shared(settings.nsfw_classifier), settings.nsfw_threshold)


_LOADED: dict[str, ImageClassifier] = {}


def _shared(spec: str) -> ImageClassifier:
    """One classifier per name in a process (the input and output checks and every worker
    thread share its model)."""
    if spec not in _LOADED:
        _LOADED[spec] = load_classifier(spec)
    return _LOADED[spec]
