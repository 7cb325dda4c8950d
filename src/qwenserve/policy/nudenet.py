"""The default image classifier: NudeNet 3.4's ONNX detector (shipped inside its wheel, runs
offline on a CPU in tens of milliseconds).

NudeNet is AGPL-3.0, so it is an optional extra the operator installs knowingly
(``pip install 'qwenserve[nsfw]'``), never a core dependency; it is imported only here, and only
when the policy classifies images.

The score is the detector's highest confidence for an exposed sexual body part
(``NSFW_LABELS``); covered parts, faces, feet, bellies, armpits and male chests do not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwenserve.policy import PolicyConfigError

if TYPE_CHECKING:
    from PIL import Image

NSFW_LABELS = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)
"""The NudeNet labels that make an image NSFW here."""


class NudeNetClassifier:
    """``ImageClassifier`` over ``nudenet.NudeDetector`` (its bundled 320n model).

    Raises:
        PolicyConfigError: nudenet is not installed.
    """

    def __init__(self) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise PolicyConfigError(
                "the content policy's image classifier needs NudeNet (AGPL-3.0): "
                "pip install 'qwenserve[nsfw]', or name another with QWENSERVE_NSFW_CLASSIFIER"
            ) from None
        # One ONNX session, shared: its run() is thread-safe and NudeNet keeps no per-call state.
        self._detector: Any = NudeDetector()

    def detections(self, image: Image.Image) -> list[dict[str, Any]]:
        """NudeNet's raw detections (``class``, ``score``, ``box``) for ``image``."""
        import numpy as np

        # NudeNet converts its input with RGBA→BGR, so hand it RGBA pixels.
        pixels = np.asarray(image.convert("RGBA"))
        found: list[dict[str, Any]] = self._detector.detect(pixels)
        return found

    def score(self, image: Image.Image) -> float:
        return max(
            (float(d["score"]) for d in self.detections(image) if d["class"] in NSFW_LABELS),
            default=0.0,
        )
