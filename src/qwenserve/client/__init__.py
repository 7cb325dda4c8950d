"""Python client for qwenserve (httpx only): the segmind SDK's surface, sync and asyncio.

from qwenserve.client import QwenServeClient
client = QwenServeClient(base_url="http://127.0.0.1:8000/v1")   # key: QWENSERVE_API_KEY
result = client.run("qwen-image-fast", prompt="a lighthouse", steps=8)
job = client.submit_async("qwen-image", prompt="a lighthouse")
job.wait(on_progress=lambda u: print(u.status, u.queue_position, u.fraction, u.eta_s))
"""

from qwenserve.client.aio import AsyncJob, AsyncQwenServeClient
from qwenserve.client.core import StatusUpdate
from qwenserve.client.errors import (
    AlreadyEnded,
    InferenceFailed,
    InferenceTimeout,
    QwenServeClientError,
)
from qwenserve.client.sync import Job, QwenServeClient

__all__ = [
    "AlreadyEnded",
    "AsyncJob",
    "AsyncQwenServeClient",
    "InferenceFailed",
    "InferenceTimeout",
    "Job",
    "QwenServeClient",
    "QwenServeClientError",
    "StatusUpdate",
]
