"""EXP-006: Cache Reconstruction Performance — the experiment runner.

    python -m experiments.exp_006_benchmark                      # the plan, in full, on MLX's default device
    python -m experiments.exp_006_benchmark --device cpu --budget-s 4 --ttft-repeats 1
    python -m experiments.exp_006_benchmark --quick                # a smoke run: under 30 s on 2 CPU cores
    python -m experiments.exp_006_benchmark --output-dir experiments/results    # replace the committed CPU run
    python -m experiments.exp_006_benchmark --combine cpu.json gpu.json real-*/exp_006_results.json --doc docs/results/exp-006.md

Writes ``exp_006_results.json`` (every statistic and raw sample, the machine, versions and command),
``exp_006_report.md`` (the plan's tables) and ``exp_006_scaling.png`` to ``--output-dir``: by default a
new scratch folder (printed at the end), never the committed results in experiments/results/. tqdm and
matplotlib are optional: without them there is no progress bar or plot, and the JSON says so.
Errors a user can fix (a bad option value, unknown device, a model that does not load, a pool too small)
exit with code 2 and a message. MLX is imported only after the options are read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # imported in main(), after the options are read: importing MLX takes seconds
    from experiments import exp_006_measure as measure

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "experiments" / "results"
RESULTS_JSON = "exp_006_results.json"
REPORT_MD = "exp_006_report.md"
PLOT_PNG = "exp_006_scaling.png"
DOC = REPO / "docs" / "results" / "exp-006.md"
MODEL_PRESET = "smollm2-135m"
HAND_WRITTEN = "<!-- Written by hand from here on: --combine keeps it. -->"

QUICK = dict(warmup=1, iterations=5, min_iterations=1, blocks=(1, 2), layers=(12,), geometries=("smollm2-135m",),
             ttft_tokens=(64,), ttft_repeats=1, ttft_warmup=0, leak_round_trips=20, model_preset="tiny-llama")
"""``--quick``: a tiny grid, few repeats and the smallest model (the plan's loops generate 100 tokens:
2 minutes with smollm2-135m on 2 CPU cores), for tests and smoke runs; explicit options still win."""


def whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def int_list(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> Tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.exp_006_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cpu or gpu (default: gpu when MLX has one, else cpu)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PATH",
                       help="an mlx-lm model folder for the engine cases (mlx_lm.load), or a real model of "
                            "semantic.models (smollm2-135m-instruct, gemma3-270m)")
    model.add_argument("--model-preset",
                       help=f"a semantic.testing.local_models preset (default {MODEL_PRESET}; --quick: tiny-llama)")
    parser.add_argument("--warmup", type=whole(0), help="warm-up calls per measurement (plan: 10)")
    parser.add_argument("--iterations", type=whole(1), help="timed calls per measurement (plan: 100)")
    parser.add_argument("--budget-s", type=seconds,
                        help="seconds one measurement may take; slower cases get fewer iterations (default: none)")
    parser.add_argument("--min-iterations", type=whole(1),
                        help="the fewest timed calls --budget-s may leave (default 10)")
    parser.add_argument("--blocks", type=int_list, help="grid block counts (default 1,2,4,8,16,32)")
    parser.add_argument("--layers", type=int_list, help="grid layer counts (default 12,24,30,48)")
    parser.add_argument("--geometries", type=name_list,
                        help="grid geometries (default: all of semantic/benchmarking/cases.py's GEOMETRIES)")
    parser.add_argument("--write-geometries", type=name_list,
                        help="geometries whose extraction and round trip are measured too (default: all of the grid)")
    parser.add_argument("--ttft-tokens", type=int_list,
                        help="prompt lengths of the time-to-first-token comparison (default CPU 256,1024,2048; "
                             "GPU up to 8192)")
    parser.add_argument("--ttft-repeats", type=whole(1),
                        help="time-to-first-token runs per length and kind (default 3)")
    parser.add_argument("--ttft-warmup", type=whole(0),
                        help="untimed time-to-first-token runs before those (default 1; 0 on CPU saves minutes)")
    parser.add_argument("--leak-round-trips", type=whole(1), help="round trips of the leak check (default 1000)")
    parser.add_argument("--pool-blocks", type=whole(1),
                        help="the engine's pool (default: 500, more if the prompts need it)")
    parser.add_argument("--git-commit", metavar="SHA",
                        help="the commit to record when the checkout has no .git (a copied working tree)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny grid, few repeats, tiny-llama: a smoke run of seconds, not minutes")
    parser.add_argument("--output-dir", type=Path,
                        help=f"where the results go (default: a new scratch folder; with --combine, {RESULTS_DIR}, "
                             "the plots the document shows)")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="write the results document from these runs' JSON instead of measuring")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"the document --combine writes (default {DOC})")
    args = parser.parse_args(argv)
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file, not a folder")
    for path in args.combine or ():
        if not path.is_file():
            parser.error(f"--combine {path}: no such file")
    if args.model_preset is None:
        args.model_preset = QUICK["model_preset"] if args.quick else MODEL_PRESET
    return args


def settings_from(args: argparse.Namespace, device: str) -> measure.Settings:
    from experiments import exp_006_measure as measure
    from semantic.benchmarking import cases

    defaults = measure.Settings(device, ttft_tokens=measure.GPU_TTFT_TOKENS if device == "gpu" else cases.ENGINE_TOKENS)

    def pick(name: str):
        given = getattr(args, name)
        if given is not None:
            return given
        return QUICK[name] if args.quick and name in QUICK else getattr(defaults, name)

    geometries = pick("geometries")
    settings = measure.Settings(
        device=device, warmup=pick("warmup"), iterations=pick("iterations"), min_iterations=pick("min_iterations"),
        budget_s=pick("budget_s"), blocks=pick("blocks"), layers=pick("layers"), geometries=geometries,
        write_geometries=args.write_geometries if args.write_geometries is not None else geometries,
        ttft_tokens=pick("ttft_tokens"), ttft_repeats=pick("ttft_repeats"), ttft_warmup=pick("ttft_warmup"),
        leak_round_trips=pick("leak_round_trips"), pool_blocks=args.pool_blocks, quick=args.quick,
    )
    check_settings(settings)
    return settings


def check_settings(settings: measure.Settings) -> None:
    from experiments import exp_006_measure as measure
    from semantic.benchmarking import cases

    unknown = sorted(set(settings.geometries + settings.write_geometries) - set(cases.GEOMETRIES))
    if unknown:
        raise measure.ExperimentError(f"unknown geometry {', '.join(unknown)}; known: {', '.join(cases.GEOMETRIES)}")
    if settings.iterations < 1 or settings.warmup < 0 or settings.min_iterations < 1:
        raise measure.ExperimentError("--iterations and --min-iterations must be at least 1, --warmup at least 0")
    if settings.ttft_repeats < 1 or settings.leak_round_trips < 1 or settings.ttft_warmup < 0:
        raise measure.ExperimentError("--ttft-repeats and --leak-round-trips must be at least 1, --ttft-warmup at least 0")
    if min(settings.ttft_tokens) <= measure.TTFT_NEW_TOKENS:
        raise measure.ExperimentError(f"--ttft-tokens must exceed {measure.TTFT_NEW_TOKENS}, the new turn's length")
    if settings.pool_blocks is not None and settings.pool_blocks < 1:
        raise measure.ExperimentError("--pool-blocks must be at least 1")


def load_model(args: argparse.Namespace):
    """``(model, tokenizer, description)``: ``--model PATH`` through ``mlx_lm.load``, else a local preset."""
    from experiments import exp_006_measure as measure
    from semantic.domain.errors import SemanticError
    from semantic.domain.value_objects import ModelCacheSpec

    from semantic.models import MODELS

    if args.model in MODELS:  # a real model, fetched once per machine; float32 on a CPU with OpenBLAS
        from semantic.models import fetch, load

        model, tokenizer = load(args.model)
        source, name = "path", f"{args.model} (semantic.models, {fetch(args.model)})"
    elif args.model:
        import mlx_lm

        if not Path(args.model).is_dir():  # else mlx_lm.load would take it for a Hugging Face repo and download
            raise measure.ExperimentError(f"cannot load the model at {args.model}: no such folder. "
                                          "--model takes a local mlx-lm model folder")
        try:
            model, tokenizer = mlx_lm.load(args.model)
        except Exception as error:  # mlx_lm.load raises whatever the folder's files provoke
            raise measure.ExperimentError(
                f"cannot load the model at {args.model}: {type(error).__name__}: {error}. "
                "--model takes an mlx-lm model folder (config.json, *.safetensors, tokenizer files)"
            ) from error
        source, name = "path", str(args.model)
    else:
        from semantic.testing.local_models import load_local_model

        try:
            model, tokenizer = load_local_model(args.model_preset)
        except SemanticError as error:
            raise measure.ExperimentError(str(error)) from error
        source, name = "preset", args.model_preset
    try:
        spec = ModelCacheSpec.from_model(model)
    except SemanticError as error:
        raise measure.ExperimentError(f"{name}: {error}") from error
    return model, tokenizer, {"source": source, "name": name, "spec": spec.describe()}


class Progress:
    """A tqdm bar on stderr, or one line per step where tqdm is not installed."""

    def __init__(self, total: int, notes: List[str]):
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
            notes.append("tqdm is not installed: progress went to stderr as plain lines, no bar")
        else:
            self._bar = tqdm(total=total, file=sys.stderr, desc="EXP-006", unit="step", dynamic_ncols=True)
        self._done, self._total = 0, total

    def run(self, label: str, fn: Callable, *args):
        if self._bar is None:
            print(f"[{self._done + 1}/{self._total}] {label}", file=sys.stderr, flush=True)
        else:
            self._bar.set_postfix_str(label)
        result = fn(*args)
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
        return result

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run(settings: measure.Settings, model, tokenizer, model_info: dict, command: str,
        git_commit: Optional[str] = None) -> dict:
    """Every section of the plan, in one process; returns the results document (``SCHEMA``)."""
    from experiments import exp_006_measure as measure

    started = time.perf_counter()
    notes: List[str] = []
    environment = measure.environment(settings.device, git_commit)
    engine = measure.build_engine(model, tokenizer, settings)  # first: a pool too small fails before any waiting
    grid = measure.grid(settings)
    padded = measure.padded_geometries(settings)
    progress = Progress(len(grid) + len(padded) + 2 + len(settings.ttft_tokens), notes)
    try:
        records = [progress.run(f"{g} {b}x{n}", measure.measure_case, g, b, n, settings) for g, b, n in grid]
        padded_records = [progress.run(f"padded {g}", measure.padded_comparison, g, settings) for g in padded]
        leak = progress.run("leak check", measure.leak_check, settings)
        plan = progress.run("plan loops", measure.plan_loops, engine, settings)
        ttft = [progress.run(f"TTFT {n} tokens", measure.time_to_first_token, engine, n, settings)
                for n in settings.ttft_tokens]
    finally:
        progress.close()
    leak["engine_pool"] = measure.engine_pool_state(engine)
    engine.close()
    environment["load_average_end"] = list(os.getloadavg())
    notes += run_notes(records, padded_records, plan, ttft, settings)
    return {
        "schema_version": 1,
        "experiment": "EXP-006",
        "title": "Cache Reconstruction Performance",
        "created_utc": measure.timestamp(),
        "command": command,
        "duration_s": time.perf_counter() - started,
        "environment": environment,
        "settings": settings.as_dict(),
        "model": {**model_info, "pool_blocks": engine.pool.total_blocks},
        "cases": records,
        "targets": measure.targets(records),
        "extraction": measure.extraction_targets(records),
        "round_trip": measure.round_trip_target(records),
        "scaling": measure.scaling(records),
        "padded": padded_records,
        "ttft": ttft,
        "leak": leak,
        "plan_loops": plan,
        "notes": notes,
    }


def run_notes(records, padded_records, plan, ttft, settings: measure.Settings) -> List[str]:
    """What a reader of the tables must know: trimmed and skipped measurements."""
    measurements = [m for r in records for m in list(r.get("ops", {}).values()) + ([r["baseline"]] if "baseline" in r else [])]
    measurements += [p[k] for p in padded_records for k in ("padded", "block_based")]
    measurements += [plan[k] for k in ("reconstruct", "extract", "round_trip")] + [t["reconstruct"] for t in ttft]
    notes = []
    trimmed = [m for m in measurements if m["trimmed"]]
    if trimmed:
        notes.append(f"--budget-s {settings.budget_s}: {len(trimmed)} of {len(measurements)} measurements ran fewer "
                     f"than the plan's {settings.warmup} warm-ups + {settings.iterations} iterations (at least "
                     f"{settings.min_iterations} timed); their iteration counts are marked (trimmed).")
    skipped = [r for r in records if r["skipped"]]
    if skipped:
        notes.append("not run for lack of memory: " + "; ".join(
            f"{r['geometry']} {r['blocks']} x {r['layers']} ({r['skipped']})" for r in skipped))
    if settings.ttft_repeats < 3:
        notes.append(f"time to first token: {settings.ttft_repeats} run(s) per prompt length and kind.")
    return notes


def results_folder(args: argparse.Namespace) -> Path:
    """``--output-dir``, else a new scratch folder: a measuring run never replaces the committed results
    unless told to."""
    return args.output_dir or Path(tempfile.mkdtemp(prefix="exp006-"))


def write_outputs(results: dict, output_dir: Path) -> List[Path]:
    from experiments import exp_006_report as report

    output_dir.mkdir(parents=True, exist_ok=True)
    plot = output_dir / PLOT_PNG
    if not report.plot_scaling(results, plot):
        plot = None
        results["notes"].append("matplotlib is not installed: no scaling plot (--combine draws it from the JSON)")
    json_path = output_dir / RESULTS_JSON
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    report_path = output_dir / REPORT_MD
    report_path.write_text(report.render_report(results, plot.name if plot else None))
    return [json_path, report_path] + ([plot] if plot else [])


def load_results(path: Path) -> dict:
    from experiments import exp_006_measure as measure
    from experiments.exp_006_schema import validate

    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested past Python's limit
        raise measure.ExperimentError(f"cannot read {path}: {error}") from error
    problems = validate(results)
    if problems:
        raise measure.ExperimentError(f"{path} is not an EXP-006 results file: " + "; ".join(problems[:5]))
    return results


def combine(paths: Sequence[Path], doc: Path, output_dir: Path, command: str) -> List[Path]:
    """The results document from runs' JSON, CPU first, the runs of one machine oldest first (old left of
    new); a scaling plot per preset run where matplotlib is installed. Runs of a real model (``--model``)
    give their time to first token only."""
    from experiments import exp_006_report as report

    runs = sorted((load_results(p) for p in paths),
                  key=lambda r: (r["environment"]["device"], r["environment"]["device_name"], r["created_utc"]))
    kept = hand_written(doc)  # before any plot is written: a document that cannot be read stops it all
    doc.parent.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    written, plotted = [], []
    presets = [r for r in runs if not report.real_model(r)]
    # tagged by file name, not label: two CPUs of different names would share "cpu"
    for results, tag, label in zip(presets, report.run_tags(presets, same=run_slug), report.run_labels(presets)):
        plot = output_dir / f"exp_006_scaling_{run_slug(results, tag)}.png"
        if report.plot_scaling(results, plot, label):
            written.append(plot)
            plotted.append((results, os.path.relpath(plot, doc.parent)))
        else:
            plotted.append((results, None))
    text = report.render_doc(plotted, [r for r in runs if report.real_model(r)], command)
    doc.write_text(text + kept)
    return [doc] + written


def hand_written(doc: Path) -> str:
    """What follows ``HAND_WRITTEN`` in the document as it stands: notes that the JSON cannot regenerate
    (runs not combined, their comparisons), kept through a regeneration."""
    from experiments import exp_006_measure as measure

    try:
        text = doc.read_text() if doc.is_file() else ""
    except (OSError, UnicodeDecodeError) as error:
        raise measure.ExperimentError(f"cannot read the document {doc} to keep its hand-written part: {error}") \
            from error
    return "\n" + text[text.index(HAND_WRITTEN):] if HAND_WRITTEN in text else ""


def run_slug(results: dict, tag: Optional[str] = None) -> str:
    """``cpu``, or ``gpu-nvidia-h100-80gb-hbm3``: one file name per machine when several GPUs ran; with the
    ``tag`` (``report.run_tags``) of a machine's several runs, ``cpu-c210285``, so the new does not overwrite
    the old."""
    env = results["environment"]
    name = (env["device"] if env["device"] == "cpu" else f"{env['device']} {env['device_name']}") + (
        f" {tag}" if tag else "")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def command_line(argv: Optional[Sequence[str]]) -> str:
    return "python -m experiments.exp_006_benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from experiments import exp_006_measure as measure
    from experiments import exp_006_report as report
    from semantic.domain.errors import SemanticError

    try:
        if args.combine:
            paths = combine(args.combine, args.doc, args.output_dir or RESULTS_DIR, command_line(argv))
        else:
            output_dir = results_folder(args)
            output_dir.mkdir(parents=True, exist_ok=True)  # now: not found unusable after the whole measurement
            device = measure.select_device(args.device)
            settings = settings_from(args, device)
            model, tokenizer, model_info = load_model(args)
            results = run(settings, model, tokenizer, model_info, command_line(argv), args.git_commit)
            paths = write_outputs(results, output_dir)
            for entry in results["targets"]:
                print(f"{entry['name']:<24} p95 {report.ms(entry['p95_ms']):>12}  target < "
                      f"{report.ms(entry['target_ms'])}  {entry['status']}")
    except (measure.ExperimentError, SemanticError, OSError, UnicodeDecodeError) as error:  # OSError: a folder
        print(f"exp_006_benchmark: error: {error}", file=sys.stderr)                      # under a file, ...
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
