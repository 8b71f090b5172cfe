"""The shape of an EXP-006 results file (``exp_006_results.json``), as JSON Schema (draft 2020-12), checked
with the ``jsonschema`` library. Every part says what it holds (``description``); times are milliseconds
unless a name ends in ``_s``, sizes are bytes."""

from __future__ import annotations

from typing import Any, List

from jsonschema import Draft202012Validator

NUMBER = {"type": "number"}
COUNT = {"type": "integer", "minimum": 0}
STATUS = {"enum": ["PASS", "FAIL", "NOT RUN"]}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "EXP-006 results",
    "description": "One run of experiments/exp_006_benchmark.py: the plan's cache reconstruction, extraction and "
                   "round-trip timings over a grid of context sizes, judged against the plan's targets, with "
                   "the machine, settings and every raw sample",
    "type": "object",
    "required": ["schema_version", "experiment", "title", "created_utc", "command", "duration_s", "environment",
                 "settings", "model", "cases", "targets", "extraction", "round_trip", "scaling", "padded", "ttft",
                 "leak", "plan_loops", "notes"],
    "properties": {
        "schema_version": {"enum": [1], "description": "this layout's version: bumped when a field changes meaning"},
        "experiment": {"enum": ["EXP-006"]},
        "title": {"type": "string"},
        "created_utc": {"type": "string", "description": "when the run ended, ISO 8601 UTC"},
        "command": {"type": "string", "description": "the command line that produced this file"},
        "duration_s": {**NUMBER, "description": "wall time of the whole run, seconds"},
        "environment": {
            "type": "object",
            "description": "the machine and software the run measured: device, CPU, memory, versions, git commit, load",
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
            "description": "the options the run used (counts of warm-ups and iterations, the grid, the engine cases)",
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
            "description": "the model of the engine cases: a local preset or an mlx-lm folder, its cache geometry",
            "required": ["source", "name", "spec", "pool_blocks"],
            "properties": {"source": {"enum": ["preset", "path"]}, "pool_blocks": COUNT},
        },
        "cases": {"type": "array", "items": {"$ref": "#/$defs/case"},
                  "description": "one per point of the grid (geometry x blocks x layers)"},
        "targets": {"type": "array", "items": {"$ref": "#/$defs/judged"},
                    "description": "the plan's reconstruction targets, p95 judged against each"},
        "extraction": {"type": "array", "items": {"$ref": "#/$defs/judged"},
                       "description": "the plan's extraction targets"},
        "round_trip": {"$ref": "#/$defs/judged", "description": "the plan's full-cycle target (8 blocks)"},
        "scaling": {
            "type": "object",
            "description": "linear fits of reconstruction time against blocks x layers (per geometry) and bytes",
            "required": ["latency", "per_geometry", "bytes", "r2_threshold", "status"],
            "properties": {
                "per_geometry": {"type": "object", "additionalProperties": {"$ref": "#/$defs/fit"}},
                "bytes": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/fit"}]},
                "status": STATUS,
            },
        },
        "padded": {
            "type": "array",
            "description": "the same bytes rebuilt from blocks vs copied from a padded monolithic cache",
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
            "description": "time to first token per prompt length: resumed from blocks (cached_s) vs prefilled (direct_s), seconds",
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
            "description": "free blocks and active memory before and after many round trips: both must come back",
            "required": ["case", "round_trips", "pool_total_blocks", "free_blocks_before", "free_blocks_after",
                         "active_bytes_before", "active_bytes_after", "tolerance_bytes", "status", "engine_pool"],
            "properties": {
                "status": STATUS,
                "engine_pool": {"type": "object", "required": ["total_blocks", "free_blocks_after", "status"]},
            },
        },
        "plan_loops": {
            "type": "object",
            "description": "the plan's three benchmark loops as written, through the engine",
            "required": ["context_tokens", "generated_tokens", "reconstruct", "extract", "extracted_tokens",
                         "round_trip"],
            "properties": {name: {"$ref": "#/$defs/measurement"} for name in ("reconstruct", "extract", "round_trip")},
        },
        "notes": {"type": "array", "items": {"type": "string"},
                  "description": "what a reader of the tables must know: trimmed or skipped measurements, missing tools"},
    },
    "$defs": {
        "stats": {
            "type": "object",
            "description": "summary of samples: count, mean, standard deviation, extremes, percentiles (linear interpolation)",
            "required": ["n", "mean", "std", "min", "max", "p50", "p95", "p99"],
            "properties": {"n": COUNT, **{k: NUMBER for k in ("mean", "std", "min", "max", "p50", "p95", "p99")}},
        },
        "measurement": {
            "type": "object",
            "description": "one timed call: warm-ups and iterations run (trimmed: fewer, by --budget-s), its stats and samples, ms",
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
            "description": "one grid point: the context's size, each operation's measurement, the plain-copy baseline and bandwidths (skipped: why not run)",
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
            "description": "a plan target: the case, its p95 and the target (ms), PASS / FAIL / NOT RUN and why",
            "required": ["name", "geometry", "blocks", "layers", "tokens", "op", "target_ms", "p95_ms", "status",
                         "reason"],
            "properties": {"p95_ms": {"type": ["number", "null"]}, "status": STATUS,
                           "reason": {"type": ["string", "null"]}},
        },
        "fit": {
            "type": "object",
            "description": "least-squares line: slope, intercept, R² over n points",
            "required": ["slope", "intercept", "r2", "n"],
            "properties": {k: NUMBER for k in ("slope", "intercept", "r2")},
        },
    },
}



def validate(instance: Any, schema: dict = SCHEMA) -> List[str]:
    """Every way ``instance`` breaks ``schema``, as ``"$.path: problem"`` lines; empty when it conforms."""
    validator = Draft202012Validator(schema)
    return [f"{error.json_path}: {error.message}"
            for error in sorted(validator.iter_errors(instance), key=lambda e: (list(e.absolute_path), e.message))]
