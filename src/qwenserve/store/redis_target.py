"""Where the Redis store lives, as ``qwenserve.backends.parse_store_url`` parsed it: plain data,
importable without redis-py (the embedded setup never loads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass(frozen=True)
class RedisTarget:
    """Where the Redis store lives, as parsed once from the store URL.

    Either one server (``host``, ``port``) or, when ``sentinels`` is not empty, the primary of
    the Sentinel ``service`` (``host``/``port`` unused). ``password`` is the data nodes' (the
    Sentinels themselves are reached without one).
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    sentinels: tuple[Address, ...] = ()
    service: str = ""

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """The target for logs: no password."""
        if self.uses_sentinel:
            nodes = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"redis+sentinel://{nodes}/{self.service}/{self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"
