"""EXP-006 runner: its statistics, its judging of the plan's targets, its JSON, its errors.

The end-to-end check is ``--quick`` on the tiny-llama preset (seconds); nothing here asserts a timing.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from jsonschema import Draft202012Validator

# experiments/ is a folder of runnable plans at the repository root, not part of the installed package:
# plain `pytest tests` (unlike `python -m pytest`) does not put the root on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import exp_006_benchmark as runner  # noqa: E402
from experiments import exp_006_measure as measure  # noqa: E402
from experiments import exp_006_report as report  # noqa: E402
from experiments.exp_006_schema import SCHEMA, validate  # noqa: E402
from experiments.stats import fit_line, summarize  # noqa: E402
from semantic.benchmarking import cases  # noqa: E402


# ---- statistics ---------------------------------------------------------------------------------------
def test_summary_of_one_to_a_hundred():
    summary = summarize(list(range(1, 101)))
    # linear interpolation between order statistics: rank q/100 * (n - 1)
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p95"] == pytest.approx(95.05)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["mean"] == pytest.approx(50.5)
    assert summary["std"] == pytest.approx(29.011491975882016)
    assert (summary["n"], summary["min"], summary["max"]) == (100, 1, 100)


def test_summary_of_few_samples_interpolates():
    summary = summarize([4.0, 1.0, 3.0, 2.0])
    assert summary["p50"] == pytest.approx(2.5)
    assert summary["p95"] == pytest.approx(3.85)
    assert summarize([7.0]) == {"n": 1, "mean": 7.0, "std": 0.0, "min": 7.0, "max": 7.0,
                                "p50": 7.0, "p95": 7.0, "p99": 7.0}
    with pytest.raises(ValueError):
        summarize([])


def test_fit_of_an_exact_line():
    xs = [12, 24, 96, 240, 480, 1536]
    fit = fit_line(xs, [0.25 + 0.004 * x for x in xs])
    assert fit.slope == pytest.approx(0.004)
    assert fit.intercept == pytest.approx(0.25)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_of_scattered_points():
    fit = fit_line([0, 1, 2, 3], [1, 3, 2, 4])
    # Sxy = 4, Sxx = 5; residuals -0.3, 0.9, -0.9, 0.3: SS_res = 1.8 of SS_tot = 5
    assert (fit.slope, fit.intercept, fit.r2) == pytest.approx((0.8, 1.3, 0.64))
    assert fit_line([1, 2, 3], [5, 5, 5]).r2 == 1.0
    with pytest.raises(ValueError, match="two distinct"):
        fit_line([3, 3], [1, 2])


def _record(geometry, blocks, layers, p50_ms, ops=("reconstruct",)):
    spec = cases.spec_for(geometry, layers)
    n_tokens = blocks * spec.block_size
    timing = {"warmup": 0, "iterations": 1, "trimmed": False, "samples_ms": [p50_ms],
              "stats_ms": summarize([p50_ms])}
    return {"geometry": geometry, "blocks": blocks, "layers": layers, "tokens": n_tokens,
            "block_layers": blocks * layers, "blocks_moved": spec.blocks_per_agent(n_tokens),
            "nbytes": spec.bytes_per_agent(n_tokens), "skipped": None, "ops": {op: timing for op in ops}}


def test_scaling_recovers_the_cost_per_block_and_the_bandwidth():
    records = [_record("smollm2-135m", b, n, 0.5 + 0.01 * b * n) for b in cases.BLOCKS for n in cases.LAYERS]
    scaling = measure.scaling(records)
    fit = scaling["per_geometry"]["smollm2-135m"]
    assert fit["us_per_block"] == pytest.approx(10.0)
    assert fit["intercept"] == pytest.approx(0.5)
    assert fit["r2"] == pytest.approx(1.0)
    block_bytes = cases.spec_for("smollm2-135m", 1).bytes_per_block_per_layer
    assert scaling["bytes"]["gbps"] == pytest.approx(block_bytes / 0.01 / 1e6)  # bytes per ms -> GB/s
    assert scaling["status"] == "PASS"


def test_targets_pass_fail_and_not_run():
    fast, slow = cases.TARGET_CASES[0], cases.TARGET_CASES[1]
    records = [
        _record(fast.geometry, fast.blocks, fast.layers, fast.target_ms / 2, ops=("reconstruct", "extract")),
        _record(slow.geometry, slow.blocks, slow.layers, slow.target_ms * 2),
    ]
    judged = {e["name"]: e for e in measure.targets(records)}
    assert judged[fast.name]["status"] == "PASS"
    assert judged[slow.name]["status"] == "FAIL"
    assert judged[cases.TARGET_CASES[4].name]["status"] == "NOT RUN"
    assert judged[cases.TARGET_CASES[4].name]["nice_to_have_ms"] == cases.NICE_TO_HAVE_MS
    extraction = measure.extraction_targets(records)
    assert [e["status"] for e in extraction] == ["PASS", "NOT RUN"]
    records[1]["skipped"] = "needs about 9 GiB"
    del records[1]["ops"]
    skipped = {e["name"]: e for e in measure.targets(records)}[slow.name]
    assert (skipped["status"], skipped["reason"]) == ("NOT RUN", "needs about 9 GiB")


def test_measure_trims_to_the_budget_and_counts_what_it_ran():
    plan = measure.Settings("cpu", warmup=1, iterations=4)
    full = measure.measure(lambda: mx.zeros(4), plan)
    assert (full["warmup"], full["iterations"], full["trimmed"]) == (1, 4, False)
    assert len(full["samples_ms"]) == full["stats_ms"]["n"] == 4
    tight = measure.Settings("cpu", warmup=10, iterations=100, min_iterations=3, budget_s=1e-12)
    trimmed = measure.measure(lambda: mx.zeros(4), tight)
    assert (trimmed["warmup"], trimmed["iterations"], trimmed["trimmed"]) == (2, 3, True)


def test_the_schema_is_valid_json_schema_and_names_what_is_wrong():
    Draft202012Validator.check_schema(SCHEMA)  # an unknown or misspelt keyword's value would fail here
    assert "$: 'schema_version' is a required property" in validate({"experiment": "EXP-006"})
    assert "$.experiment: 'EXP-007' is not one of ['EXP-006']" in validate({"experiment": "EXP-007"})
    case = SCHEMA["$defs"]["case"]
    problems = validate({"geometry": 3, "blocks": 1}, {**case, "$defs": SCHEMA["$defs"]})
    assert "$.geometry: 3 is not of type 'string'" in problems
    assert "$: 'nbytes' is a required property" in problems
    assert all(part.get("description") for part in [SCHEMA, *SCHEMA["$defs"].values()])


# ---- the quick run, end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick`` on tiny-llama, with tqdm and matplotlib hidden as on the GPU image."""
    out = tmp_path_factory.mktemp("exp006")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tqdm", None)  # a None entry makes the import fail
        patch.setitem(sys.modules, "matplotlib", None)
        code = runner.main(["--quick", "--device", "cpu", "--output-dir", str(out)])  # tiny-llama: --quick's
    assert code == 0
    return out, json.loads((out / runner.RESULTS_JSON).read_text())


def test_quick_run_writes_results_that_match_the_schema(quick_run):
    out, results = quick_run
    assert validate(results) == []
    assert results["settings"]["quick"] is True
    assert results["environment"]["device"] == "cpu"
    assert results["environment"]["mlx_version"] == mx.__version__
    assert results["command"].startswith("python -m experiments.exp_006_benchmark --quick")
    grid = [(r["geometry"], r["blocks"], r["layers"]) for r in results["cases"]]
    assert grid == [("smollm2-135m", 1, 12), ("smollm2-135m", 2, 12)]
    for record in results["cases"]:
        assert set(record["ops"]) == {"reconstruct", "extract", "round_trip"}
        assert record["baseline_kind"] == "memcpy"
        assert all(len(m["samples_ms"]) == 5 for m in record["ops"].values())
    assert [t["status"] for t in results["targets"]][1:] == ["NOT RUN"] * 4
    assert results["targets"][0]["status"] in ("PASS", "FAIL")
    assert results["leak"]["status"] == "PASS"
    assert results["leak"]["engine_pool"]["status"] == "PASS"
    assert results["plan_loops"]["round_trip"]["iterations"] == 5
    assert [t["tokens"] for t in results["ttft"]] == [64]


def test_quick_run_without_tqdm_or_matplotlib_says_so(quick_run):
    out, results = quick_run
    assert not (out / runner.PLOT_PNG).exists()
    assert any("tqdm is not installed" in note for note in results["notes"])
    assert any("matplotlib is not installed" in note for note in results["notes"])


def test_report_has_the_plans_tables(quick_run):
    out, _ = quick_run
    text = (out / runner.REPORT_MD).read_text()
    for heading in ("| Configuration | Iterations | Mean | p50 | p95 | p99 | Status |",
                    "| Configuration | p95 | Status |", "| Full cycle (8 blocks) | p95 | Status |",
                    "| Blocks | Layers | Total Ops | Expected p95 | Actual p95 |"):
        assert heading in text
    assert "TBD" not in text


def test_combine_writes_the_results_document(quick_run, tmp_path):
    out, results = quick_run
    doc = tmp_path / "exp-006.md"
    assert runner.main(["--combine", str(out / runner.RESULTS_JSON), "--doc", str(doc),
                        "--output-dir", str(tmp_path)]) == 0
    text = doc.read_text()
    assert "## Summary" in text and "### Reading" in text
    assert results["command"] in text
    assert "GPU: not run yet" in text


def test_combine_names_the_model_of_every_time_to_first_token_row(quick_run, tmp_path):
    """A run on a real model (``--model``) adds its rows to "Time to first token, by model" and nothing to the
    Summary; until one ran on a GPU the document says how to make it. What is written by hand below the
    marker stays."""
    out, results = quick_run
    runs = []
    for device, name in (("cpu", "gemma3-270m"), ("gpu", "smollm2-135m-instruct")):
        real = json.loads(json.dumps(results))
        real["environment"].update(device=device, device_name="Test GPU" if device == "gpu" else "test CPU")
        real["model"].update(source="path", name=f"{name} (semantic.models, /cache/{name})")
        real["ttft"][0]["direct_stats_s"]["mean"] = 12.5 if device == "cpu" else 0.0125
        path = tmp_path / f"{device}.json"
        path.write_text(json.dumps(real))
        runs.append(path)
    doc = tmp_path / "exp-006.md"

    def combined(*paths):
        assert runner.main(["--combine", str(out / runner.RESULTS_JSON), *map(str, paths), "--doc", str(doc),
                            "--output-dir", str(tmp_path)]) == 0
        return doc.read_text()

    doc.write_text(f"an older generated part\n\n{runner.HAND_WRITTEN}\n\n## By hand\n\nkept\n")
    text = combined(runs[0])
    assert "an older generated part" not in text
    assert text.endswith(f"\n\n{runner.HAND_WRITTEN}\n\n## By hand\n\nkept\n")
    summary, by_model = text.split("## Summary")[1].split("## Time to first token, by model")
    assert summary.count("CPU (") == 1 and "gemma3-270m" not in summary  # the preset run alone
    rows = [line for line in by_model.split("\n## ")[0].splitlines() if line.startswith("| ") and "64 |" in line]
    preset, = [row for row in rows if "| tiny-llama preset (random weights, " in row]
    real, = [row for row in rows if row.startswith("| CPU (test CPU) | gemma3-270m (real weights, ")]
    assert "12.5 s" in real and "12.5 s" not in preset
    assert "GPU, real models: not run yet" in by_model and report.GPU_REAL_MODELS_COMMAND in by_model
    assert "## CPU (test CPU)" not in text  # no section of its own
    text = combined(*runs)
    assert "| GPU (Test GPU) | smollm2-135m-instruct (real weights, " in text
    assert "GPU, real models: not run yet" not in text
    assert {p.name for p in tmp_path.glob("*.png")} <= {"exp_006_scaling_cpu.png"}  # the preset run's plot alone


def test_combine_sets_runs_of_one_machine_side_by_side_old_first(quick_run, tmp_path):
    """Issue 10: a re-run next to the old run of the same machine. Each is told apart by its commit wherever
    the document names it (Summary column, section, time to first token row, plot file), the older first
    whatever the order given; a machine with one run keeps its plain label and plot name."""
    out, results = quick_run
    runs = {}
    for name, device, commit, created in (("new", "cpu", "bbbbbbb0123", "2026-12-02T10:00:00Z"),
                                          ("old", "cpu", "aaaaaaa4567", "2026-11-28T10:00:00Z"),
                                          ("gpu", "gpu", "ccccccc8901", "2026-11-30T10:00:00Z")):
        run = json.loads(json.dumps(results))
        run["environment"].update(git_commit=commit, **({"device": "gpu", "device_name": "Test GPU"}
                                                        if device == "gpu" else {}))
        run["created_utc"] = created
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
        runs[name] = run
    doc = tmp_path / "exp-006.md"
    assert runner.main(["--combine", *(str(tmp_path / f"{name}.json") for name in runs), "--doc", str(doc),
                        "--output-dir", str(tmp_path)]) == 0
    text = doc.read_text()
    cpu = report.device_label(results)
    old, new = f"{cpu} at aaaaaaa", f"{cpu} at bbbbbbb"
    assert f"| Case | Target p95 | {old} | {new} | GPU (Test GPU) |" in text
    assert 0 < text.index(f"\n## {old}\n") < text.index(f"\n## {new}\n") < text.index("\n## GPU (Test GPU)\n")
    ttft = [line.split(" | ")[0] for line in text.split("## Time to first token, by model")[1].split("\n## ")[0]
            .splitlines() if "| tiny-llama preset" in line]
    assert ttft == [f"| {old}", f"| {new}", "| GPU (Test GPU)"]
    assert [runner.run_slug(runs[name], tag) for name, tag in zip(("old", "new", "gpu"), report.run_tags(
        [runs["old"], runs["new"], runs["gpu"]]))] == ["cpu-aaaaaaa", "cpu-bbbbbbb", "gpu-test-gpu"]
    if report.plot_scaling(results, tmp_path / "probe.png"):  # matplotlib is installed
        assert {f"exp_006_scaling_{slug}.png" for slug in ("cpu-aaaaaaa", "cpu-bbbbbbb", "gpu-test-gpu")} <= {
            p.name for p in tmp_path.glob("*.png")}
        assert "](exp_006_scaling_cpu-aaaaaaa.png)" in text and "](exp_006_scaling_gpu-test-gpu.png)" in text
    # re-runs of one commit: their times tell them apart
    again = {**runs["old"], "created_utc": "2026-11-29T10:00:00Z"}
    assert report.run_labels([runs["old"], again]) == [f"{old} 2026-11-28T10:00:00Z", f"{old} 2026-11-29T10:00:00Z"]


def test_plot_draws_one_series_per_geometry(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, results = quick_run
    assert report.plot_scaling(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


# ---- errors a user can fix: exit code 2 and a message -------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "-5"], "argument --budget-s: expected a positive number of seconds, got -5"),
    (["--budget-s", "nan"], "argument --budget-s: expected a positive number of seconds, got nan"),
    (["--iterations", "0"], "argument --iterations: expected an integer of at least 1, got 0"),
    (["--warmup", "two"], "argument --warmup: expected an integer, got 'two'"),
    (["--pool-blocks", "-1"], "argument --pool-blocks: expected an integer of at least 1, got -1"),
    (["--blocks", "1,x"], "argument --blocks: expected comma-separated integers, got '1,x'"),
    (["--combine", "/nonexistent.json"], "--combine /nonexistent.json: no such file"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_options_exit_2_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        runner.parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_files_and_folders_that_cannot_be_used_exit_2_before_anything_is_measured_or_written(quick_run, tmp_path,
                                                                                              monkeypatch, capsys):
    """Tracebacks before: JSON nested past the recursion limit, a --doc under a file or not UTF-8 (after the plots
    were written), an --output-dir under a file (after the whole measurement)."""
    results = str(quick_run[0] / runner.RESULTS_JSON)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "binary.md").write_bytes(b"\xff\xfe not UTF-8")
    monkeypatch.setattr(measure, "select_device", lambda *args: pytest.fail("measured before its folder was made"))
    for argv, message in (
            (["--combine", str(tmp_path / "deep.json")], "cannot read"),
            (["--combine", results, "--doc", str(tmp_path / "a-file" / "doc.md")], "File exists"),
            (["--combine", results, "--doc", str(tmp_path / "binary.md")], "cannot read the document"),
            (["--quick", "--output-dir", str(tmp_path / "a-file" / "out")], "Not a directory")):
        assert runner.main([*argv, "--output-dir", str(tmp_path / "plots")] if "--combine" in argv else argv) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "binary.md", "deep.json"]


@pytest.mark.parametrize("argv, message", [
    (["--resume-tokens", "abc"], "--resume-tokens must be token counts separated by commas, got 'abc'"),
    (["--resume-tokens", "256,0"], "--resume-tokens must be at least 1"),
    (["--preset", "nosuch"], "--preset must be one of"),
    (["--resume-repeat", "0"], "--resume-repeat must be at least 1"),
    (["--repeat", "0"], "--repeat must be at least 1"),
])
def test_hot_path_bad_options_exit_2_before_anything_runs(argv, message, capsys, monkeypatch):
    """They ended in a traceback (--resume-tokens, --preset: after minutes of copy cases) or in NaN columns."""
    from experiments import hot_path

    monkeypatch.setattr(hot_path, "copy_cases", lambda *args: pytest.fail("ran before its options were checked"))
    monkeypatch.setattr("sys.argv", ["hot_path", *argv])
    with pytest.raises(SystemExit) as exited:
        hot_path.main()
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_help_imports_no_mlx():
    """``--help`` answers at once: MLX (seconds to import) only after the options are read."""
    code = ("import sys; from experiments import exp_006_benchmark as r\n"
            "try:\n    r.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True,
                   capture_output=True)


def test_measuring_writes_to_a_scratch_folder_by_default(monkeypatch, tmp_path):
    """Never over the committed results: without --output-dir, a new folder under the temp dir."""
    monkeypatch.setattr(runner.tempfile, "tempdir", str(tmp_path))
    scratch = runner.results_folder(runner.parse_args(["--quick"]))
    assert scratch.parent == tmp_path and scratch.name.startswith("exp006-") and scratch.is_dir()
    assert runner.results_folder(runner.parse_args(["--output-dir", "experiments/results"])) == Path("experiments/results")


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cpu", "--model", "/nonexistent/model"], "cannot load the model at /nonexistent/model"),
    (["--device", "cpu", "--model-preset", "no-such-model"], "unknown local model preset"),
    (["--device", "cpu", "--geometries", "llama-70b"], "unknown geometry llama-70b"),
    (["--device", "cpu", "--quick", "--pool-blocks", "2"], "--pool-blocks 2 is too small"),
])
def test_clear_errors(argv, message, capsys):
    assert runner.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_folder_that_is_no_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert runner.main(["--device", "cpu", "--model", str(tmp_path)]) == 2
    assert f"cannot load the model at {tmp_path}" in capsys.readouterr().err


@pytest.mark.skipif(mx.is_available(mx.gpu), reason="this MLX has a GPU")
def test_gpu_without_a_gpu_backend(capsys):
    assert runner.main(["--device", "gpu"]) == 2
    assert "no GPU backend" in capsys.readouterr().err


def test_combine_refuses_a_file_that_is_not_results(tmp_path, capsys):
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"experiment": "EXP-006"}))
    assert runner.main(["--combine", str(bogus), "--doc", str(tmp_path / "doc.md")]) == 2
    assert "is not an EXP-006 results file" in capsys.readouterr().err
