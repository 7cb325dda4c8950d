"""The model catalog: each slug's parameter contract, price and recipe, and request validation."""

from qwenserve.catalog.models import ALL_MODELS, MODELS
from qwenserve.catalog.request import CONTENT_TYPES, GenerationRequest, InputImage, LoraRef
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
    "Param",
    "PipelineKind",
    "Recipe",
    "SchedulerKind",
    "get_model",
    "validate_request",
]
