"""JSON schemas the structured-output tests share: answers of the demo model's random weights finish
well within a test's token limit under them (bounded strings, numbers and arrays)."""

from __future__ import annotations

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
# A keyword the grammar engine does not implement: a 422 (gRPC INVALID_ARGUMENT) naming it.
UNSERVABLE = {"type": "object", "properties": {"a": {"not": {}}}, "required": ["a"]}
