"""History on the dashboard (docs/benchmarks.md, "History"): backfilling commits with
``tools/bench_history.py``, and the reference machines' results kept in ``benchmarks/results/``.

The backfill runs on a throwaway repository of a tiny package, through the project's asv.conf.json
(its virtualenv, the package built and installed per commit): three commits, the second adding a
feature a benchmark measures, the third making another benchmark much slower.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from asv.config import Config
from asv.results import iter_results_for_machine
from asv.util import load_json

from asv_helpers import FORK, ROOT, asv, config_for, git, table_rows

sys.path.insert(0, str(ROOT / "tools"))
import bench_history  # noqa: E402

MACHINE = "history-test"
REBUILD = "bench_tiny.Rebuild.time_rebuild"
STORE = "bench_tiny.Store.time_store"

TINY_SETUP = 'from setuptools import setup\n\nsetup(name="semantic", version="0.0.1", packages=["semantic"])\n'

TINY_BLOCKS = '''import mlx.core as mx


def rebuild(blocks):
    return mx.concatenate(blocks, axis=0)
'''

# The planted regression waits 1 s: a step must stand far above this machine's noise. The unchanged 32 MiB
# copy measured 22 ms on one commit and 80 ms on the next in a CI rehearsal (a doubled copy did not), and
# 25 ms and 213 ms in another, where a 0.25 s wait (0.286 s in all) made no 1.5x step.
TINY_BLOCKS_SLOWER = '''import time

import mlx.core as mx


def rebuild(blocks):
    time.sleep(1.0)
    return mx.concatenate(blocks, axis=0)
'''

TINY_STORE = '''import mlx.core as mx


def store(block):
    return block + 0
'''

TINY_BENCHMARKS = '''import mlx.core as mx

BLOCKS = [mx.full((256, 2048), i, dtype=mx.float32) for i in range(16)]  # 32 MiB: the copy dominates


class Rebuild:
    def setup(self):
        from semantic.blocks import rebuild

        self.rebuild = rebuild
        mx.eval(BLOCKS)

    def time_rebuild(self):
        mx.eval(self.rebuild(BLOCKS))


class Store:
    """The feature the second commit adds: the first commit skips it."""

    def setup(self):
        try:
            from semantic.store import store
        except ImportError as exc:
            raise NotImplementedError(f"this commit has no store: {exc}") from exc
        self.store = store
        mx.eval(BLOCKS)

    def time_store(self):
        mx.eval(self.store(BLOCKS[0]))
'''


def commit_files(repo: pathlib.Path, message: str, files: dict) -> str:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def backfill(env: dict, config: pathlib.Path, repo: pathlib.Path, *options: str,
             machine: str = MACHINE) -> subprocess.CompletedProcess:
    """``tools/bench_history.py`` as ``make bench-history`` runs it, on ``repo``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_history.py"), "--config", str(config), "--machine", machine,
         *options, "--", *FORK, "--show-stderr"],
        cwd=repo, env=env, capture_output=True, text=True,
    )


def publish(env: dict, config: pathlib.Path) -> subprocess.CompletedProcess:
    """``make dashboard``: the reference results synced in, asv publish, the libraries vendored."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "asv_dashboard.py"), "--config", str(config),
                           "publish"], env=env, capture_output=True, text=True, check=True)


# Details no host reports: a backfill must record these, not the host's.
PINNED = {"arch": "x86_64", "cpu": "Pinned CPU", "machine": MACHINE, "num_cpu": "2", "os": "Linux 0.0-pinned",
          "ram": "1234567", "version": 1}


def values_by_commit(results_dir: pathlib.Path, name: str, machine: str = MACHINE) -> dict:
    """commit hash -> the benchmark's value there (None: failed, nan: skipped)."""
    benchmarks = load_json(str(results_dir / "benchmarks.json"), api_version=2)
    return {
        result.commit_hash: result.get_result_value(name, benchmarks[name]["params"])[0]
        for result in iter_results_for_machine(str(results_dir), machine)
    }


@pytest.fixture(scope="module")
def history(asv_home, asv_env_dir, tmp_path_factory):
    """The tiny package's three commits, backfilled once: (repo, config, scratch dir, run, commits)."""
    tmp = tmp_path_factory.mktemp("history")
    repo = tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commits = [
        commit_files(repo, "rebuild", {
            "setup.py": TINY_SETUP, "semantic/__init__.py": "", "semantic/blocks.py": TINY_BLOCKS,
            "benchmarks/__init__.py": "", "benchmarks/bench_tiny.py": TINY_BENCHMARKS,
        }),
        commit_files(repo, "store", {"semantic/store.py": TINY_STORE}),
        commit_files(repo, "slower rebuild", {"semantic/blocks.py": TINY_BLOCKS_SLOWER}),
    ]
    reference = tmp / "asv" / "reference"  # the committed benchmarks/results/ of this repository
    (reference / MACHINE).mkdir(parents=True)
    (reference / MACHINE / "machine.json").write_text(json.dumps(PINNED, indent=4, sort_keys=True))
    config = config_for(tmp / "asv", repo=repo, env_dir=str(asv_env_dir), reference_results_dir=str(reference))
    run = backfill(asv_home, config, repo)
    return repo, config, tmp / "asv", run, commits


def test_backfill_measures_every_commit_and_skips_a_missing_feature(history):
    _, _, tmp, run, (first, second, third) = history
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    rebuild = values_by_commit(tmp / "reference", REBUILD)
    store = values_by_commit(tmp / "reference", STORE)
    assert set(rebuild) == {first, second, third}, output[-6000:]
    assert all(value is not None and value > 0 for value in rebuild.values()), rebuild
    assert store[first] != store[first], f"the store benchmark ran on the commit before the store: {store}"
    assert store[second] > 0 and store[third] > 0, store
    assert "this commit has no store" in output  # asv says why it skipped
    report = output[output.index("asv results for machine"):]
    for commit in (first, second, third):
        assert f"{commit[:8]} " in report and "FAILED" not in report, report


def machine_graphs(html: pathlib.Path, name: str, machine: str) -> list:
    """The dashboard's graph files of benchmark ``name`` on ``machine`` (one per environment)."""
    return [p for p in html.glob(f"graphs/**/{name}.json") if f"machine-{machine}" in p.parts]


def graph_points(html: pathlib.Path, name: str, machine: str) -> list:
    """The [revision, value] points the dashboard draws for a benchmark without parameters on ``machine``."""
    (path,) = machine_graphs(html, name, machine)
    return json.loads(path.read_text())


def test_a_reference_machine_keeps_its_committed_details(history):
    """Backfilling a reference machine writes into its committed folder, every result with the committed
    details (a reboot's new kernel or RAM reading would split its series), machine.json untouched."""
    _, _, tmp, _, _ = history
    folder = tmp / "reference" / MACHINE
    assert json.loads((folder / "machine.json").read_text()) == PINNED
    results = list(iter_results_for_machine(str(tmp / "reference"), MACHINE))
    assert len(results) == 3
    for result in results:
        assert {k: result.params[k] for k in ("os", "ram", "cpu")} == \
            {"os": PINNED["os"], "ram": PINNED["ram"], "cpu": PINNED["cpu"]}, result.params
    assert not (tmp / "results" / MACHINE).exists(), "a reference machine's results went to the results dir"


def test_hashfile_and_git_ranges(history, asv_home, tmp_path):
    """asv's documented range forms: a HASHFILE relative to the caller's folder (run: nothing new to
    measure, every listed commit reported), and git's, read as asv reads them (first parents)."""
    repo, config, _, _, (first, second, third) = history
    hashes = tmp_path / "commits.txt"
    hashes.write_text(f"{first[:8]}\n\n{third}\n")
    run = backfill(asv_home, config, repo, f"HASHFILE:{os.path.relpath(hashes, repo)}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    report = output[output.index("asv results for machine"):]
    assert "2 commit(s)" in report and f"{first[:8]} " in report and f"{third[:8]} " in report, report
    conf = Config.load(str(config))
    assert bench_history.commits_in(conf, f"{third}^!") == [third]
    assert bench_history.commits_in(conf, f"{first}..{third}") == [third, second]
    assert bench_history.commits_in(conf, "NEW") is None  # asv's own: every measured commit is reported


def test_dashboard_draws_three_points_and_compare_shows_the_step(history, asv_home):
    _, config, tmp, _, (first, second, third) = history
    publish(asv_home, config)  # the reference machine's results, synced into the results dir
    points = graph_points(tmp / "html", REBUILD, MACHINE)
    values = [value for _, value in sorted(points)]  # by revision: the commits' order on main
    assert len(values) == 3 and all(v is not None for v in values), points
    assert values[2] > 1.5 * values[1], f"no step from the second to the third commit: {values}"
    assert [v is None for _, v in sorted(graph_points(tmp / "html", STORE, MACHINE))] in (
        [False, False], [True, False, False]), "the store graph should hold the two commits that have it"

    # asv compare reads the results dir, where publish copied the reference machine's results
    compare = asv(asv_home, config, "compare", "--machine", MACHINE, "--factor", "1.25", second, third)
    rows = {row[-1]: row for row in table_rows(compare.stdout)}
    assert rows[REBUILD][0] == "+", compare.stdout  # asv's mark for "slower"
    assert float(rows[REBUILD][-2]) > 1.5, compare.stdout  # the ratio column
    # The unchanged store is compared too (both commits have it). Whether asv marks it is left to the
    # machine: a ~0.1 ms benchmark swung 1.4x between two identical commits on a loaded 2-core CI host.
    # asv writes "~0.72" for a ratio whose difference it finds insignificant.
    assert float(rows[STORE][-2].lstrip("~")) > 0, compare.stdout


def test_backfill_passes_over_a_commit_that_does_not_build(history, asv_home):
    """A fourth commit whose setup.py is broken: reported and passed over; the three commits measured
    before are not run again (their result files are untouched)."""
    repo, config, tmp, _, _ = history
    results = tmp / "reference" / MACHINE
    before = {p.name: p.read_bytes() for p in results.glob("*.json") if p.name != "machine.json"}
    broken = commit_files(repo, "break the build", {"setup.py": "this is not python\n"})
    run = backfill(asv_home, config, repo)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    report = output[output.index("asv results for machine"):]
    assert f"{broken[:8]}" in report and "BUILD FAILED" in report, report
    after = {p.name: p.read_bytes() for p in results.glob("*.json") if p.name != "machine.json"}
    assert {name: after[name] for name in before} == before, "commits measured before were run again"
    assert len(after) == len(before) + 1


def test_backfill_in_an_existing_interpreter(history, asv_home, tmp_path):
    """``--existing``: the interpreter running these tests (MLX installed; no virtualenv, nothing
    built), each commit exported and imported through ASV_PYTHONPATH, as on a CUDA machine without a
    package index; two benchmarks at a time (``--jobs``, one GPU each there), merged per commit. A fresh
    HOME: the tool must describe the machine itself. ``--bench`` narrows a run to some benchmarks (a device
    lent for minutes); a later run measures the rest and leaves what was measured."""
    repo, _, _, _, (first, second, third) = history
    config = config_for(tmp_path / "asv", repo=repo)
    env = dict(asv_home, HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    results = tmp_path / "asv" / "results"
    run = backfill(env, config, repo, "--existing", sys.executable, "--bench", r"\.Rebuild\.", third,
                   machine="history-existing")
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    rebuild = values_by_commit(results, REBUILD, "history-existing")
    assert set(rebuild) == {first, second, third}
    measured = {name for result in iter_results_for_machine(str(results), "history-existing")
                for name in result.get_all_result_keys()}
    assert measured == {REBUILD}, measured
    run = backfill(env, config, repo, "--existing", sys.executable, "--jobs", "2", third, machine="history-existing")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "3 benchmark(s) x commit(s) to measure" in output, output[-6000:]  # the store's, not the rebuild's again
    assert values_by_commit(results, REBUILD, "history-existing") == rebuild
    store = values_by_commit(results, STORE, "history-existing")
    assert set(rebuild) == {first, second, third} and all(v and v > 0 for v in rebuild.values()), rebuild
    assert store[first] != store[first] and store[second] > 0, store  # the export of each commit was measured
    described = json.loads((results / "history-existing" / "machine.json").read_text())
    assert described["num_cpu"] == str(os.cpu_count()) and described["cpu"], described


# ---- the reference machines' results, committed -------------------------------------------------------
RESULTS = ROOT / "benchmarks" / "results"
SUITE_LANDED = "f11c728"  # "asv benchmark suite, EXP-006 runner and results": every commit since is measured
REFERENCE = {"ref-cpu-2core": None, "ref-h200-cuda": 2}  # machine -> commits it must have (None: no gaps)
RECONSTRUCT = "bench_reconstruct.Reconstruct.time_reconstruct"


def measured_commits(html: pathlib.Path, machine: str) -> set:
    """Revisions (positions on main) where the dashboard has a reconstruction time on ``machine``."""
    paths = machine_graphs(html, RECONSTRUCT, machine)
    assert paths, f"no reconstruction graph for {machine}"
    revisions = set()
    for path in paths:
        for revision, values in json.loads(path.read_text()):
            if any(v is not None for v in (values if isinstance(values, list) else [values])):
                revisions.add(revision)
    return revisions


def plant_slowdown(results: pathlib.Path, machine: str, commit: str, name: str, case: str) -> None:
    """Double every time ``name`` recorded for ``case`` on ``commit``, as a real 2x slowdown would."""
    (path,) = (results / machine).glob(f"{commit[:8]}-*.json")
    data = json.loads(path.read_text())
    columns = data["result_columns"]
    row = data["results"][name]
    index = row[columns.index("params")][0].index(repr(case))
    for column in ("result", "stats_ci_99_a", "stats_ci_99_b", "stats_q_25", "stats_q_75", "samples"):
        values = row[columns.index(column)] if column in columns and len(row) > columns.index(column) else None
        if values and values[index] is not None:
            value = values[index]
            values[index] = [2 * v for v in value] if isinstance(value, list) else 2 * value
    path.write_text(json.dumps(data))


def test_committed_history_publishes_both_machines_and_lists_only_a_real_regression(asv_home, tmp_path):
    """``make dashboard`` on a fresh clone, nothing run: both reference machines' history is drawn, the
    front page's thumbnails draw the CPU reference alone, and the Regressions page lists nothing but a
    2x slowdown planted on the CPU reference's two newest commits (none of the committed steps is one: GB/s
    and ratio tracks improved, the rest is run-to-run noise)."""
    reference = tmp_path / "reference"
    shutil.copytree(RESULTS, reference)
    history = subprocess.run(["git", "rev-list", "--first-parent", "--reverse", "main"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    measured = {p.name[:8] for p in (reference / "ref-cpu-2core").glob("*-*.json")}
    # A commit made it 2x slower and the next kept it: asv lists a step once it held for two commits.
    for commit in [h for h in history if h[:8] in measured][-2:]:
        plant_slowdown(reference, "ref-cpu-2core", commit, RECONSTRUCT, "smollm2-135m 8x30")
    config = config_for(tmp_path, reference_results_dir=str(reference))
    publish(asv_home, config)

    regressions = json.loads((tmp_path / "html" / "regressions.json").read_text())["regressions"]
    assert [(entry[0], entry[2]["machine"]) for entry in regressions] == \
        [(f"{RECONSTRUCT}('smollm2-135m 8x30')", "ref-cpu-2core")], regressions
    index = json.loads((tmp_path / "html" / "index.json").read_text())
    assert set(REFERENCE) <= set(index["params"]["machine"]), index["params"]["machine"]
    # The front page's thumbnail: the CPU reference's history alone, no H200 point averaged in.
    (cpu_graph,) = machine_graphs(tmp_path / "html", RECONSTRUCT, "ref-cpu-2core")
    expected = {revision: math.prod(v for v in values if v) ** (1 / len([v for v in values if v]))
                for revision, values in json.loads(cpu_graph.read_text()) if any(values)}
    summary = json.loads((tmp_path / "html" / "graphs" / "summary" / f"{RECONSTRUCT}.json").read_text())
    assert {revision: pytest.approx(value) for revision, value in summary} == expected
    revisions = index["revision_to_hash"]
    landed = next(i for i, h in enumerate(history) if h.startswith(SUITE_LANDED))
    for machine, minimum in REFERENCE.items():
        measured = {revisions[str(r)] for r in measured_commits(tmp_path / "html", machine)}
        if minimum is not None:
            assert len(measured) >= minimum, f"{machine}: {len(measured)} commit(s) measured"
            continue
        newest_index = max(history.index(h) for h in measured)
        missing = [h[:8] for h in history[landed:newest_index + 1] if h not in measured]
        assert newest_index >= landed and not missing, f"{machine}: commits since the suite landed, unmeasured: {missing}"
