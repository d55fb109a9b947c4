"""Validate a manifest the way the API server does with our CRD: prune-check, default, schema, then CEL.

Independent references do the judging: `jsonschema` (Draft 4, the dialect OpenAPI v3.0 builds on) for
the structural schema, `celpy` (cel-python) for the `x-kubernetes-validations` rules. This module only
walks the schema to apply defaults (as the API server's defaulting does) and to find the rules.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema

_env = celpy.Environment()
_programs: dict[str, Any] = {}


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: a missing property with a `default` gets it, recursively, deepest last."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (kubectl's strict field validation rejects them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def _to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """int-or-string is an x- extension; spell it for jsonschema. Everything else is already Draft 4."""
    out = {}
    for key, value in schema.items():
        if key == "properties":
            value = {k: _to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = _to_jsonschema(value)
        out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    return out


def cel_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule on the value it is attached to (self)."""
    out: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _programs.get(rule["rule"])
        if program is None:
            program = _programs[rule["rule"]] = _env.program(_env.compile(rule["rule"]))
        try:
            result = program.evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as exc:  # the API server rejects on evaluation errors too
            result = exc
        if isinstance(result, Exception) or not bool(result):
            out.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                out += cel_errors(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += cel_errors(item, schema["items"], f"{path}[{i}]")
    return out


def validate(manifest: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    """Every error the API server would report for this manifest (empty list: accepted)."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    obj = apply_defaults(copy.deepcopy(manifest), schema)
    errors = [f"unknown field {field}" for field in unknown_fields(obj, schema)]
    if obj.get("metadata", {}).get("name") is None:
        errors.append("metadata.name: Required value")
    validator = jsonschema.Draft4Validator(_to_jsonschema(schema))
    for error in validator.iter_errors(obj):
        where = ".".join(str(p) for p in error.absolute_path)
        errors.append(f"{where}: {error.message}")
    if not errors:  # the API server runs CEL only on a schema-valid object
        errors += cel_errors(obj, schema)
    return errors
