"""Image classifiers the tests plug in through ``NSFW_CLASSIFIER`` (``module:callable``), the
way an operator plugs in their own: real code, no mocks."""

from __future__ import annotations

from PIL import Image, ImageStat


class RedClassifier:
    """Scores an image by how red it is (its mean red channel, 0-1): the worker tests' engine
    paints the seed into the red channel, so a seed picks whether the output is flagged."""

    def score(self, image: Image.Image) -> float:
        return float(ImageStat.Stat(image.convert("RGB")).mean[0]) / 255.0


def flag_everything() -> RedClassifier:
    """A factory function (not a class): every image scores 1."""

    class Always(RedClassifier):
        def score(self, image: Image.Image) -> float:
            return 1.0

    return Always()


def not_a_classifier() -> object:
    """A factory that makes something with no ``score``: refused at startup."""
    return object()
