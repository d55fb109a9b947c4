"""Generate the LLMDeployment CustomResourceDefinition from the pydantic models in `api`.

    python -m pagedserve.operator.crdgen > crds/llmdeployments.pagedserve.io.yaml   (or: make crds)

pydantic writes JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no
`$ref`, no `null` branches (absent means unset), int-or-string and free-form objects spelt with the
`x-kubernetes-*` extensions. The conversion is small and total: an unknown construct raises.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from pagedserve.operator import api

CRD_FILE = "crds/llmdeployments.pagedserve.io.yaml"
_DROP = {"title", "$defs"}
_KEEP = {
    "type", "properties", "items", "required", "description", "default", "enum", "format", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
    "maxItems", "additionalProperties", "x-kubernetes-validations", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}


def structural(node: dict[str, Any], defs: dict[str, Any], *, keep_defaults: bool = True) -> dict[str, Any]:
    """Turn one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # siblings of $ref (description, default) win
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if node.get("default", 0) is None:
            node.pop("default")
        if node.get("x-kubernetes-int-or-string"):
            branches = []
        elif len(branches) == 1:
            node = {**branches[0], **node}
            return structural(node, defs, keep_defaults=keep_defaults)
        if branches:
            raise ValueError(f"union types cannot be expressed structurally: {branches}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key not in _KEEP:
            raise ValueError(f"unsupported JSON-Schema keyword {key!r} in {node}")
        if key == "default" and not keep_defaults:
            continue
        if key == "properties":
            value = {name: structural(sub, defs, keep_defaults=keep_defaults) for name, sub in value.items()}
        elif key == "items":
            value = structural(value, defs, keep_defaults=keep_defaults)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # OpenAPI v3.0 (what Kubernetes speaks) writes these as flags beside minimum/maximum.
            out[key.replace("exclusiveM", "m")] = value
            value = True
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
                continue
            value = structural(value, defs, keep_defaults=keep_defaults)
        out[key] = value
    if out.get("type") == "object" and "properties" in out and "additionalProperties" in out:
        out.pop("additionalProperties")  # pydantic's extra=ignore; structural schemas prune unknown fields
    return out


def model_schema(model: type[api.Model], *, keep_defaults: bool = True) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return structural(schema, schema.get("$defs", {}), keep_defaults=keep_defaults)


def openapi_schema() -> dict[str, Any]:
    spec = model_schema(api.LLMDeploymentSpec)
    status = model_schema(api.LLMDeploymentStatus, keep_defaults=False)  # only the operator writes status
    return {
        "type": "object",
        "required": ["spec"],
        # Children are named <name>-tp<N>; Service names are DNS-1035 labels of at most 63 characters.
        "x-kubernetes-validations": [
            {
                "rule": "self.metadata.name.size() <= 50 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS-1035 label of at most 50 characters",
            }
        ],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".status.servedModel"},
    {"name": "TP", "type": "integer", "jsonPath": ".status.tensorParallelSize"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "pagedserve", "app.kubernetes.io/part-of": "pagedserve"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "pagedserve"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m pagedserve.operator.crdgen` from operator/api.py; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
