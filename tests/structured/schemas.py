"""JSON schemas the structured-output tests generate against (each must validate)."""

from __future__ import annotations

from typing import Any

S = {"type": "string", "maxLength": 12}
# A weak model happily writes digits forever: bounded integers keep outputs finite.
INT = {"type": "integer", "minimum": 0, "maximum": 9999}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {"name": S, "age": INT},
        "required": ["name", "age"],
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": INT, "email": S},
                "required": ["id", "email"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "deeply_nested": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": INT},
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    "array_min_max": {"type": "array", "items": INT, "minItems": 2, "maxItems": 4},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "exact_items": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
    "string_enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "integer_enum": {"type": "integer", "enum": [2, 3, 5, 7]},
    "const_field": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "n": INT},
        "required": ["kind", "n"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"req": S, "opt1": INT, "opt2": S},
        "required": ["req"],
    },
    "all_optional": {
        "type": "object",
        "properties": {"x": INT, "y": INT},
    },
    "integer_range": {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 10, "maximum": 20}},
        "required": ["score"],
    },
    "negative_range": {"type": "integer", "minimum": -50, "maximum": -10},
    "number_range": {
        "type": "object",
        "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["ratio"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
        "required": ["code"],
    },
    "date_pattern": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 5},
    "boolean": {"type": "boolean"},
    "null_or_int": {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "null"}, INT]}},
        "required": ["v"],
    },
    "any_of_shapes": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"circle": {"type": "number"}},
                "required": ["circle"],
            },
            {
                "type": "object",
                "properties": {"square": INT},
                "required": ["square"],
            },
        ]
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": INT, "y": INT},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "no_additional": {
        "type": "object",
        "properties": {"id": INT},
        "required": ["id"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "array",
        "items": {"enum": ["a", "b", "c"]},
        "minItems": 1,
        "maxItems": 5,
    },
    "mixed_record": {
        "type": "object",
        "properties": {
            "title": S,
            "tags": {"type": "array", "items": S, "maxItems": 3},
            "rating": {"type": "number", "minimum": 1, "maximum": 5},
            "meta": {
                "type": "object",
                "properties": {
                    "draft": {"type": "boolean"},
                    "rev": INT,
                },
                "required": ["draft", "rev"],
            },
        },
        "required": ["title", "tags", "rating", "meta"],
    },
}
