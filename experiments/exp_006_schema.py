"""The shape of an EXP-006 results file, as JSON Schema, and a small checker for the subset it uses
(``type``, ``properties``, ``additionalProperties``, ``required``, ``items``, ``enum``, ``minimum``,
``anyOf``, ``$ref`` to ``$defs``): no ``jsonschema`` dependency, and any JSON Schema validator accepts
the same document."""

from __future__ import annotations

from typing import Any, List

NUMBER = {"type": "number"}
COUNT = {"type": "integer", "minimum": 0}
STATUS = {"enum": ["PASS", "FAIL", "NOT RUN"]}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "EXP-006 results",
    "type": "object",
    "required": ["schema_version", "experiment", "title", "created_utc", "command", "duration_s", "environment",
                 "settings", "model", "cases", "targets", "extraction", "round_trip", "scaling", "padded", "ttft",
                 "leak", "plan_loops", "notes"],
    "properties": {
        "schema_version": {"enum": [1]},
        "experiment": {"enum": ["EXP-006"]},
        "title": {"type": "string"},
        "created_utc": {"type": "string"},
        "command": {"type": "string"},
        "duration_s": NUMBER,
        "environment": {
            "type": "object",
            "required": ["device", "device_name", "cpu_name", "platform", "machine", "python", "cpu_count",
                         "memory_bytes", "mlx_version", "mlx_lm_version", "git_commit", "git_dirty",
                         "mlx_device_info", "mlx_cache_limit_bytes_at_start", "nice", "load_average_start",
                         "load_average_end"],
            "properties": {
                "device": {"enum": ["cpu", "gpu"]},
                "device_name": {"type": "string"},
                "cpu_count": {"type": ["integer", "null"]},
                "memory_bytes": {"type": ["integer", "null"]},
                "mlx_version": {"type": "string"},
                "mlx_lm_version": {"type": "string"},
                "git_commit": {"type": "string"},
                "git_dirty": {"type": ["boolean", "null"]},
                "mlx_device_info": {"type": "object"},
                "mlx_cache_limit_bytes_at_start": COUNT,
                "load_average_start": {"type": "array", "items": NUMBER},
                "load_average_end": {"type": "array", "items": NUMBER},
            },
        },
        "settings": {
            "type": "object",
            "required": ["device", "warmup", "iterations", "min_iterations", "budget_s", "blocks", "layers",
                         "geometries", "write_geometries", "ttft_tokens", "ttft_repeats", "ttft_warmup",
                         "leak_round_trips",
                         "pool_blocks", "quick"],
            "properties": {
                "warmup": COUNT,
                "iterations": COUNT,
                "budget_s": {"type": ["number", "null"]},
                "blocks": {"type": "array", "items": COUNT},
                "layers": {"type": "array", "items": COUNT},
                "quick": {"type": "boolean"},
            },
        },
        "model": {
            "type": "object",
            "required": ["source", "name", "spec", "pool_blocks"],
            "properties": {"source": {"enum": ["preset", "path"]}, "pool_blocks": COUNT},
        },
        "cases": {"type": "array", "items": {"$ref": "#/$defs/case"}},
        "targets": {"type": "array", "items": {"$ref": "#/$defs/judged"}},
        "extraction": {"type": "array", "items": {"$ref": "#/$defs/judged"}},
        "round_trip": {"$ref": "#/$defs/judged"},
        "scaling": {
            "type": "object",
            "required": ["latency", "per_geometry", "bytes", "r2_threshold", "status"],
            "properties": {
                "per_geometry": {"type": "object", "additionalProperties": {"$ref": "#/$defs/fit"}},
                "bytes": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/fit"}]},
                "status": STATUS,
            },
        },
        "padded": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["geometry", "layers", "tokens", "padded_slots", "blocks", "nbytes", "padded",
                             "block_based", "block_based_faster_by"],
                "properties": {"padded": {"$ref": "#/$defs/measurement"},
                               "block_based": {"$ref": "#/$defs/measurement"}},
            },
        },
        "ttft": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["tokens", "context_tokens", "new_tokens", "reconstruct", "cached_s", "direct_s",
                             "cached_stats_s", "direct_stats_s", "cached_faster_by"],
                "properties": {
                    "reconstruct": {"$ref": "#/$defs/measurement"},
                    "cached_s": {"type": "array", "items": NUMBER},
                    "direct_s": {"type": "array", "items": NUMBER},
                    "cached_stats_s": {"$ref": "#/$defs/stats"},
                    "direct_stats_s": {"$ref": "#/$defs/stats"},
                },
            },
        },
        "leak": {
            "type": "object",
            "required": ["case", "round_trips", "pool_total_blocks", "free_blocks_before", "free_blocks_after",
                         "active_bytes_before", "active_bytes_after", "tolerance_bytes", "status", "engine_pool"],
            "properties": {
                "status": STATUS,
                "engine_pool": {"type": "object", "required": ["total_blocks", "free_blocks_after", "status"]},
            },
        },
        "plan_loops": {
            "type": "object",
            "required": ["context_tokens", "generated_tokens", "reconstruct", "extract", "extracted_tokens",
                         "round_trip"],
            "properties": {name: {"$ref": "#/$defs/measurement"} for name in ("reconstruct", "extract", "round_trip")},
        },
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "$defs": {
        "stats": {
            "type": "object",
            "required": ["n", "mean", "std", "min", "max", "p50", "p95", "p99"],
            "properties": {"n": COUNT, **{k: NUMBER for k in ("mean", "std", "min", "max", "p50", "p95", "p99")}},
        },
        "measurement": {
            "type": "object",
            "required": ["warmup", "iterations", "trimmed", "stats_ms", "samples_ms"],
            "properties": {
                "warmup": COUNT,
                "iterations": COUNT,
                "trimmed": {"type": "boolean"},
                "stats_ms": {"$ref": "#/$defs/stats"},
                "samples_ms": {"type": "array", "items": NUMBER},
            },
        },
        "case": {
            "type": "object",
            "required": ["geometry", "blocks", "layers", "tokens", "block_layers", "blocks_moved", "nbytes", "skipped"],
            "properties": {
                "geometry": {"type": "string"},
                "nbytes": COUNT,
                "skipped": {"type": ["string", "null"]},
                "mlx_cache_limit_bytes": COUNT,
                "ops": {"type": "object", "required": ["reconstruct"],
                        "additionalProperties": {"$ref": "#/$defs/measurement"}},
                "baseline_kind": {"enum": ["memcpy", "device_copy"]},
                "baseline": {"$ref": "#/$defs/measurement"},
                "bandwidth": {"type": "object", "required": ["reconstruct_gbps", "baseline_gbps", "ratio"],
                              "additionalProperties": NUMBER},
            },
        },
        "judged": {
            "type": "object",
            "required": ["name", "geometry", "blocks", "layers", "tokens", "op", "target_ms", "p95_ms", "status",
                         "reason"],
            "properties": {"p95_ms": {"type": ["number", "null"]}, "status": STATUS,
                           "reason": {"type": ["string", "null"]}},
        },
        "fit": {
            "type": "object",
            "required": ["slope", "intercept", "r2", "n"],
            "properties": {k: NUMBER for k in ("slope", "intercept", "r2")},
        },
    },
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(instance: Any, schema: dict = SCHEMA) -> List[str]:
    """Every way ``instance`` breaks ``schema``, as ``"$.path: problem"`` lines; empty when it conforms."""
    return _check(instance, schema, "$", schema)


def _check(value: Any, schema: dict, path: str, root: dict) -> List[str]:
    if "$ref" in schema:
        return _check(value, root["$defs"][schema["$ref"].rsplit("/", 1)[1]], path, root)
    if "anyOf" in schema:
        if any(not _check(value, option, path, root) for option in schema["anyOf"]):
            return []
        return [f"{path}: matches none of the allowed shapes"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "type" in schema:
        allowed = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_TYPES[t](value) for t in allowed):
            return [f"{path}: expected {' or '.join(allowed)}, got {type(value).__name__}"]
    if "minimum" in schema and value < schema["minimum"]:
        return [f"{path}: {value} is below the minimum {schema['minimum']}"]
    errors = []
    if isinstance(value, dict):
        errors += [f"{path}: missing {key!r}" for key in schema.get("required", ()) if key not in value]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += _check(item, properties[key], f"{path}.{key}", root)
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _check(item, schema["additionalProperties"], f"{path}.{key}", root)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _check(item, schema["items"], f"{path}[{i}]", root)
    return errors
