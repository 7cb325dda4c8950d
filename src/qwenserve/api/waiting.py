"""Moved to ``qwenserve.notify.hub``; kept so existing imports keep working."""

from qwenserve.notify.hub import CompletionHub

__all__ = ["CompletionHub"]
