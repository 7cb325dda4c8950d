"""Strict checks of qwenserve's OpenAI answers against the `openai` SDK's own response types.

The SDK's models are lenient (extra fields kept, a Literal value outside its set accepted with
a warning at most), so a body can parse and still carry a value a typed client never expects
(``quality: "auto"`` where the type says low/medium/high/…). ``assert_conforms`` walks the body
with the model's annotations: every field is one the type declares, every required one is
there, and every value is one its annotation allows (Literal sets read by ``typing.get_args``).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from openai import BaseModel


def assert_conforms(model: type[BaseModel], data: Any, where: str = "") -> None:
    """Raise AssertionError naming the path of the first value ``model`` does not allow."""
    where = where or model.__name__
    assert isinstance(data, dict), f"{where}: expected an object, got {data!r}"
    model.model_validate(data)  # the SDK's own parse (types, required fields)
    fields = model.model_fields
    extra = sorted(set(data) - set(fields))
    assert not extra, f"{where}: fields {extra} are not in {model.__name__}"
    for name, info in fields.items():
        if name not in data:
            assert not info.is_required(), f"{where}.{name} is required"
            continue
        _check(info.annotation, data[name], f"{where}.{name}")


def _check(annotation: Any, value: Any, where: str) -> None:
    problems = _mismatch(annotation, value, where)
    assert problems is None, problems


def _mismatch(annotation: Any, value: Any, where: str) -> str | None:
    """None when ``value`` fits ``annotation``, else why not."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        reasons = [_mismatch(arm, value, where) for arm in typing.get_args(annotation)]
        if any(reason is None for reason in reasons):
            return None
        return f"{where}: {value!r} fits none of {annotation} ({'; '.join(map(str, reasons))})"
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        return None if value in allowed else f"{where}: {value!r} not one of {allowed}"
    if annotation is type(None):
        return None if value is None else f"{where}: {value!r} is not null"
    if origin in (list, typing.List):  # noqa: UP006 (the SDK's annotations use typing.List)
        if not isinstance(value, list):
            return f"{where}: {value!r} is not a list"
        (item,) = typing.get_args(annotation)
        for index, element in enumerate(value):
            reason = _mismatch(item, element, f"{where}[{index}]")
            if reason is not None:
                return reason
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        try:
            assert_conforms(annotation, value, where)
        except AssertionError as error:
            return str(error)
        return None
    if annotation is bool:
        return None if isinstance(value, bool) else f"{where}: {value!r} is not a boolean"
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{where}: {value!r} is not an integer"
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"{where}: {value!r} is not a number"
    if annotation is str:
        return None if isinstance(value, str) else f"{where}: {value!r} is not a string"
    raise AssertionError(f"{where}: no check for annotation {annotation!r}")
