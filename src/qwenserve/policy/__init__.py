"""The operator's content policy: blocked terms in prompts, and an image classifier on outputs
and edit inputs. Off by default (``CONTENT_POLICY``); see the README's "Content policy".

Where it hooks in: the prompt check runs in ``api/jobs.py`` before the store admits (and so
before any charge); a blocked request is recorded as a job that is FAILED already, so a v2 client
polls it like any other. The image checks run in the worker: inputs after they are loaded and
before compute (``worker/screening.py``), outputs after generation and before anything is stored
(``worker/finisher.py``). Every block ends its job FAILED with kind ``content_policy``
(``errors.ContentPolicyViolation``) and one of the messages below, which never echo what matched.
Blocks are counted on /metrics from the event log (``api/metrics.py``), wherever they happened.

Nothing here imports torch or the web layer; the classifier package is imported only when the
policy classifies images.
"""

from __future__ import annotations

from typing import Literal

Stage = Literal["prompt", "input", "output"]

PROMPT_BLOCKED = "blocked by the content policy: the request's text is not allowed"
INPUT_BLOCKED = "blocked by the content policy: an input image is not allowed"
OUTPUT_BLOCKED = "blocked by the content policy: the generated image is not allowed"

_STAGES: dict[str, Stage] = {
    PROMPT_BLOCKED: "prompt",
    INPUT_BLOCKED: "input",
    OUTPUT_BLOCKED: "output",
}


class PolicyConfigError(ValueError):
    """The content policy cannot start as configured (a terms file that cannot be read, an
    invalid regular expression, a classifier that cannot be loaded); the message says which."""


def blocked_stage(message: str | None) -> Stage | None:
    """Which check blocked a job, from its stored message (None: not a policy message)."""
    return _STAGES.get(message or "")
