"""A job's typed request as the stores keep it: text only inside the stores, typed everywhere
else, and records from before sizes were fixed at admission still load."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import qwenserve
from qwenserve.catalog import GenerationRequest, OutputSize, SizeKind, validate_request
from qwenserve.jobs import Job
from qwenserve.store import fair
from qwenserve.store.records import request_from_text, request_text
from tests.store.schema_v1 import v1_params

PACKAGE = Path(qwenserve.__file__).parent
STORE_SERIALISERS = {"request_text", "request_from_text", "job_from_record"}
"""The stores' own functions that turn a request or a job into stored text and back."""
JOB_WORDS = ("job", "request", "params", "result")
"""An argument or receiver named so is a job, its request or its result."""
ALLOWED = {("api/idempotency.py", "asdict")}
"""An Idempotency-Key's fingerprint hashes a request's fields: never stored as a job."""


def test_a_request_round_trips_through_its_stored_text() -> None:
    request = validate_request(
        "qwen-image-edit-plus-product-photography",
        {
            "prompt": "un chat, 夜",
            "image_1": "https://example.com/a.png",
            "lora_2_url": "https://example.com/l.safetensors",
        },
    )
    request = dataclasses.replace(request, partial_images=1, preview_id="p")
    assert request.size == OutputSize(SizeKind.INPUT, 1024 * 1024)
    assert request_from_text(request_text(request)) == request


def test_an_explicit_size_is_kept_as_fixed() -> None:
    request = validate_request("qwen-image-2512", {"prompt": "p", "width": 300, "height": 260})
    stored = json.loads(request_text(request))
    assert stored["size"] == {"kind": "explicit", "area": 78000, "width": 300, "height": 260}
    assert request_from_text(request_text(request)).size == request.size


@pytest.mark.parametrize(
    ("slug", "ratio", "images", "expected"),
    [
        ("qwen-image", "16:9", [], OutputSize(SizeKind.RATIO, 1664 * 928, 1664, 928)),
        (
            "qwen-image-edit-fast",
            None,
            [{"field": "image", "source": "https://example.com/a.png"}],
            OutputSize(SizeKind.INPUT, 1024 * 1024),
        ),
        ("retired-slug", "1:1", [], OutputSize(SizeKind.RATIO, 1024 * 1024, 1024, 1024)),
    ],
)
def test_a_record_without_a_size_gets_the_size_its_fields_give(
    slug: str, ratio: str | None, images: list[dict[str, str]], expected: OutputSize
) -> None:
    params = {**v1_params(slug, "old", 1), "aspect_ratio": ratio, "images": images}
    request = request_from_text(json.dumps(params))
    assert request.size == expected
    assert request.slug == slug and request.prompt == "old"


def test_a_job_is_typed_and_has_no_dict_form() -> None:
    fields = {f.name for f in dataclasses.fields(Job)}
    assert "request" in fields and "params" not in fields
    for typed in (Job, GenerationRequest):
        assert not hasattr(typed, "to_dict") and not hasattr(typed, "from_dict")


def _serialising_calls(path: Path, root: Path = PACKAGE) -> list[str]:
    """Where ``path`` turns a job, its request or its result into a dict or text, or back: a
    store serialiser called or imported, ``to_dict``/``from_dict`` on one, ``asdict`` of one,
    ``json.dumps``/``json.loads`` of one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        name = None
        if isinstance(node, ast.ImportFrom):
            name = next(iter({a.name for a in node.names} & STORE_SERIALISERS), None)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            # what is serialised: a job, its request or result itself (not a response body
            # built from a few of their fields)
            about = [
                ast.unparse(a).lower()
                for a in node.args
                if isinstance(a, ast.Name | ast.Attribute | ast.Call | ast.Subscript)
            ]
            if isinstance(func, ast.Attribute):
                about.append(ast.unparse(func.value).lower())
            of_a_job = any(word in text for text in about for word in JOB_WORDS)
            if called in STORE_SERIALISERS or (
                called in ("to_dict", "from_dict", "asdict", "dumps", "loads") and of_a_job
            ):
                name = called
        if name is not None:
            found.append(f"{path.relative_to(root).as_posix()}:{getattr(node, 'lineno', 0)} {name}")
    return found


def test_only_the_stores_turn_a_job_into_text_and_back() -> None:
    """Outside ``store/`` no module turns a job, its request or its result into a dict or
    text, or back: a job carries its typed request from admission to the end."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("store/"):
            continue
        for call in _serialising_calls(path):
            if (relative, call.rsplit(" ", 1)[1]) not in ALLOWED:
                offenders.append(call)
    assert offenders == []


def test_the_scan_finds_a_serialiser_where_there_is_one(tmp_path: Path) -> None:
    """The scan above can fail: it sees the forms a job's serialisation takes."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import json\n"
        "from qwenserve.store.records import request_text\n"
        "def f(job, config):\n"
        "    config.to_dict()  # not a job: not found\n"
        "    return (job.request.to_dict(), request_from_text('x'), json.dumps(job.params),\n"
        "            asdict(request), JobResult.from_dict(data))\n"
    )
    found = [call.rsplit(" ", 1)[1] for call in _serialising_calls(sample, tmp_path)]
    assert found == ["request_text", "to_dict", "request_from_text", "dumps", "asdict", "from_dict"]


def test_the_fair_share_weighs_the_size_fixed_at_admission() -> None:
    """An aspect-ratio request costs its real size, an input-following edit its target area."""
    wide = validate_request("qwen-image", {"prompt": "p", "aspect_ratio": "16:9", "steps": 50})
    assert fair.service_units(wide) == pytest.approx(50 * 1664 * 928 / 1e6)
    square = validate_request("qwen-image", {"prompt": "p", "aspect_ratio": "1:1", "steps": 50})
    assert fair.service_units(square) > fair.service_units(wide)
    edit = validate_request(
        "qwen-image-edit-fast", {"prompt": "p", "image": "https://example.com/a.png"}
    )
    assert fair.service_units(edit) == pytest.approx(edit.steps * 1024 * 1024 / 1e6)
