"""The CRD manifest agrees with what the operator reads and writes."""

import pathlib

import yaml

from sarathi_operator import spec as specmod

CRD = yaml.safe_load((pathlib.Path(__file__).parents[2] / "crds" / "sarathideployments.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]
STATUS = SCHEMA["properties"]["status"]


def schema_defaults(props: dict) -> dict:
    """What defaulting fills into an object whose fields are all absent."""
    out = {}
    for key, prop in props.items():
        if "default" in prop:
            value = prop["default"]
            if prop.get("type") == "object":
                value = {**schema_defaults(prop.get("properties", {})), **value}
            out[key] = value
    return out


def test_identity_and_subresources():
    assert CRD["metadata"]["name"] == f"{specmod.PLURAL}.{specmod.GROUP}"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (specmod.KIND, specmod.PLURAL, ["sdep"])
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["name"] == specmod.VERSION and VERSION["storage"]
    assert VERSION["subresources"]["status"] == {}
    assert VERSION["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }


def test_operator_defaults_mirror_the_schema():
    from_schema = schema_defaults(SPEC["properties"])
    assert from_schema == {k: v for k, v in specmod.DEFAULTS.items() if k in from_schema}
    # The rest are empty containers the operator fills in for convenience only.
    assert all(not v for k, v in specmod.DEFAULTS.items() if k not in from_schema)


def test_printer_columns_point_at_fields_the_schema_has():
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["Model", "TP", "PP", "Replicas", "Ready", "Budget", "P99-TBT-ms", "Phase", "Age"]
    for path in columns.values():
        if path == ".metadata.creationTimestamp":
            continue
        node = SCHEMA
        for part in path.lstrip(".").split("."):
            node = node["properties"][part]  # KeyError: the column points nowhere


def test_every_cel_rule_names_a_field_in_its_message():
    rules = []

    def walk(node):
        rules.extend(node.get("x-kubernetes-validations", []))
        for child in node.get("properties", {}).values():
            walk(child)

    walk(SPEC)
    assert len(rules) == 12
    for rule in rules:
        assert rule["message"].startswith("spec."), rule


def test_status_schema_covers_what_the_operator_writes():
    assert STATUS["properties"]["phase"]["enum"] == ["Pending", "Progressing", "Ready", "Degraded", "Failed"]
    written = {"phase", "replicas", "readyReplicas", "tokenBudget", "selector", "observedGeneration", "conditions",
               "modelCache"}
    assert written <= set(STATUS["properties"])
    cond = STATUS["properties"]["conditions"]
    assert cond["x-kubernetes-list-map-keys"] == ["type"]


def test_schema_is_structural():
    """Every node has a type (or is int-or-string / preserves unknown fields)."""
    def walk(node, path):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}[*]")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(SCHEMA, "")


# What a structural schema node may say (apiextensions.k8s.io/v1 JSONSchemaProps, as used here).
SCHEMA_KEYWORDS = {
    "type", "description", "properties", "required", "items", "additionalProperties", "default", "enum",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "pattern", "format", "anyOf", "nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}


def test_every_schema_node_uses_only_schema_keywords():
    """A stray key (say, YAML splitting a description at a comma) is refused by the API server."""
    def walk(node, path):
        assert set(node) <= SCHEMA_KEYWORDS, (path, set(node) - SCHEMA_KEYWORDS)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        for key in ("additionalProperties", "items"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(SCHEMA, "")
