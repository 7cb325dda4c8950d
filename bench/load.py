"""Load generation for the benchmarks: concurrent async clients, bounded in time."""

from __future__ import annotations

import asyncio
import time

import httpx


async def hammer(
    url: str,
    method: str,
    seconds: float,
    headers: dict[str, str],
    json: object,
    concurrency: int = 16,
) -> float:
    """Requests per second that ``concurrency`` clients get through in ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.request(method, url, json=json)
                if response.status_code >= 400:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)
