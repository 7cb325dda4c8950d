"""The model catalog: each slug's parameter contract, price and recipe, request validation and
the JSON Schema of each slug's body."""

from qwenserve.catalog.models import ALL_MODELS, MODELS
from qwenserve.catalog.request import CONTENT_TYPES, GenerationRequest, InputImage, LoraRef
from qwenserve.catalog.schema import input_schema, model_card, model_entry
from qwenserve.catalog.sizes import OutputSize, SizeKind, SizePlan
from qwenserve.catalog.spec import (
    NO_DEFAULT,
    LoraSource,
    ModelSpec,
    Param,
    PipelineKind,
    Recipe,
    SchedulerKind,
)
from qwenserve.catalog.validate import get_model, validate_request

__all__ = [
    "ALL_MODELS",
    "CONTENT_TYPES",
    "MODELS",
    "NO_DEFAULT",
    "GenerationRequest",
    "InputImage",
    "LoraRef",
    "LoraSource",
    "ModelSpec",
    "OutputSize",
    "Param",
    "PipelineKind",
    "Recipe",
    "SchedulerKind",
    "SizeKind",
    "SizePlan",
    "get_model",
    "input_schema",
    "model_card",
    "model_entry",
    "validate_request",
]
