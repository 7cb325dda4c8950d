"""The Lua scripts, kept as files under ``lua/``, and what each one is run with.

Every job script is assembled as: the key builders (``redis_keys.LUA_KEY_FUNCTIONS``; ARGV[1] is
the key prefix), the constants below (generated from the Python ones, so error kinds, reasons
and event types are written once), ``helpers.lua``, then the script's own file.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from qwenserve.jobs import CANCELLED, EXPIRED, JobEvent, JobEventType
from qwenserve.store import rules
from qwenserve.store.records import event_from_record
from qwenserve.store.redis.client import pairs
from qwenserve.store.redis_keys import LUA_KEY_FUNCTIONS

_PACKAGE = "qwenserve.store.redis"


def _lua_string(text: str) -> str:
    if not text.isascii() or "\n" in text:
        raise ValueError(f"not a plain ASCII line: {text!r}")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_CONSTANTS: dict[str, str] = {
    "CANCELLED": CANCELLED,
    "EXPIRED": EXPIRED,
    "GIVE_UP_KIND": rules.GIVE_UP_KIND,
    "CANCELLED_BEFORE_START": rules.CANCELLED_BEFORE_START,
    "CANCELLED_WORKER_LOST": rules.CANCELLED_WORKER_LOST,
    "CANCELLED_RELEASED": rules.CANCELLED_RELEASED,
    "CANCELLED_AT_EXPIRY": rules.CANCELLED_AT_EXPIRY,
    "EXPIRED_QUEUED": rules.EXPIRED_QUEUED,
    "EXPIRED_RUNNING": rules.EXPIRED_RUNNING,
    "START_TIMEOUT_KIND": rules.START_TIMEOUT_KIND,
    "START_TIMEOUT_MESSAGE": rules.START_TIMEOUT_MESSAGE,
    "START_TIMEOUT_BATCH": str(rules.START_TIMEOUT_BATCH),
    **{f"EVENT_{event.name}": event.value for event in JobEventType},
}

LUA_CONSTANTS = "".join(f"local {name} = {_lua_string(v)}\n" for name, v in _CONSTANTS.items())


def announced(reply: Sequence[Sequence[Any]]) -> tuple[JobEvent, ...]:
    """The events a transition script appended, as it returns them (``announced`` in
    helpers.lua: each ``{id, field, value, ...}``)."""
    return tuple(event_from_record(str(entry[0]), pairs(entry[1:])) for entry in reply)


def last_announced(reply: Sequence[Sequence[Any]]) -> JobEvent | None:
    """The event a one-ending script appended last (None: it changed nothing)."""
    appended = announced(reply)
    return appended[-1] if appended else None


def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return resources.files(_PACKAGE).joinpath("lua", f"{name}.lua").read_text("utf-8")


class JobScripts:
    """Every job script, registered on one client (sent by SHA, loaded on first use)."""

    def __init__(self, client: redis.Redis) -> None:
        prelude = LUA_KEY_FUNCTIONS + LUA_CONSTANTS + source("helpers")

        def script(name: str) -> Script:
            return client.register_script(prelude + source(name))

        self.create_key = script("create_key")
        self.revoke_key = script("revoke_key")
        self.topup = script("topup")
        self.submit = script("submit")
        self.claim = script("claim")
        self.heartbeat = script("heartbeat")
        self.complete = script("complete")
        self.fail = script("fail")
        self.release = script("release")
        self.cancel = script("cancel")
        self.expire_leases = script("expire_leases")
        self.purge = script("purge")
        self.purge_history = script("purge_history")
        self.trim_events = script("trim_events")
        self.stats = script("stats")
        self.queue_position = script("queue_position")
        self.start_deadlines = script("start_deadlines")
        self.update_key = script("update_key")
        self.migrate_fair = script("migrate_fair")
        self.withdraw = script("withdraw")
