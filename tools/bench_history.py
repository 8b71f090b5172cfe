"""Backfill the asv dashboard: run the benchmark suite over the project's history on this machine,
then say what each commit gave.

    python tools/bench_history.py [--machine NAME] [--steps N] [--config FILE] [RANGE]

``RANGE`` is asv's (default ``ALL``: every commit of the configured branches; ``f11c728..main``,
``HEAD^!``, ``HEAD``, ``NEW``, ``EXISTING`` and ``HASHFILE:list`` (one commit a line, ``-`` for stdin) work
too; a git range lists first parents, as asv does). Commits this machine already has results for are not run again
(``asv run --skip-existing-commits``), so a second call measures only what is new. A commit whose
package does not build is reported and passed over, and the run goes on. The benchmarks skip (raise
``NotImplementedError`` in setup) what a commit does not have yet, so a *failed* benchmark on a
commit that built is a defect of the suite: the exit status is then 1, else 0.

``--existing PYTHON`` measures in an interpreter that already has MLX (asv cannot install it: a CUDA
machine without a package index, say). asv's ``-E existing`` measures whatever that interpreter
imports, so each commit is exported to a scratch folder that the benchmarks import ``semantic`` from
(``ASV_PYTHONPATH``), and its results are saved under that commit (``--set-commit-hash``).

A reference machine (a folder of the config's ``reference_results_dir``, ``benchmarks/results/``) is
measured into that folder, with its committed details (``asv_dashboard.pin``), so its series goes on and
its ``machine.json`` stays as committed; any other machine's results go to the config's ``results_dir``
(``.asv/results/``, git-ignored), next to copies of the reference machines'.

Extra arguments after ``--`` go to ``asv run`` unchanged (e.g. ``-- --launch-method forkserver``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import shutil
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from asv.benchmarks import Benchmarks
from asv.config import Config
from asv.environment import get_environments
from asv.machine import Machine
from asv.repo import get_repo
from asv.results import iter_results_for_machine
from asv.util import pick_n

import asv_dashboard  # tools/, next to this file

SPECIAL_RANGES = ("NEW", "EXISTING", "TAGS")  # asv's range names that git cannot resolve (ALL, HEAD are mapped)


@dataclass
class CommitOutcome:
    """What one environment's results for one commit hold, counted over parameter points."""

    commit: str
    env: str
    measured: int = 0
    skipped: int = 0
    failed: List[str] = field(default_factory=list)
    build_failed: bool = False


def asv_command(config: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "asv", "--config", config, *args]


def commits_in(conf: Config, range_spec: str) -> Optional[List[str]]:
    """The range's commits, newest first, as ``asv run`` reads the range; None for asv's NEW, EXISTING
    and TAGS (then: every measured commit)."""
    if range_spec in SPECIAL_RANGES:
        return None

    def git(*args: str) -> List[str]:
        listed = subprocess.run(["git", *args], cwd=conf.repo, capture_output=True, text=True)
        if listed.returncode != 0:
            raise SystemExit(f"bench_history: error: {range_spec!r} is not a commit range here: "
                             f"git {' '.join(args)}: {listed.stderr.strip()}")
        return listed.stdout.split()

    if range_spec.startswith("HASHFILE:"):
        names = read_hashfile(range_spec)
        return [commit for name in names for commit in git("rev-parse", "--verify", "--end-of-options",
                                                              f"{name}^{{commit}}")]
    if range_spec == "HEAD":
        return git("rev-parse", "HEAD")
    revisions = list(conf.branches) if range_spec == "ALL" else shlex.split(range_spec)
    return git("rev-list", "--first-parent", *revisions, "--")


def read_hashfile(range_spec: str) -> List[str]:
    path = range_spec[len("HASHFILE:"):]
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as error:
        raise SystemExit(f"bench_history: error: cannot read the commit list {path}: {error}") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def absolute_range(range_spec: str) -> str:
    """asv reads ``HASHFILE:path`` after changing to the config's folder: give it an absolute path."""
    if range_spec.startswith("HASHFILE:") and range_spec != "HASHFILE:-":
        return "HASHFILE:" + str(Path(range_spec[len("HASHFILE:"):]).resolve())
    return range_spec


def outcomes(conf: Config, machine: str) -> Dict[str, List[CommitOutcome]]:
    """Commit hash -> one outcome per environment, from ``machine``'s result files."""
    benchmarks = Benchmarks.load(conf)
    found: Dict[str, List[CommitOutcome]] = {}
    for result in iter_results_for_machine(conf.results_dir, machine):
        outcome = CommitOutcome(result.commit_hash, result.env_name)
        keys = [key for key in result.get_result_keys(benchmarks) if key in benchmarks]
        for key in keys:
            for value in result.get_result_value(key, benchmarks[key]["params"]):
                if value is None:
                    outcome.failed.append(key)
                elif isinstance(value, float) and math.isnan(value):
                    outcome.skipped += 1
                else:
                    outcome.measured += 1
        # asv marks every benchmark failed, with no output of its own, when the package did not build.
        outcome.build_failed = bool(keys) and outcome.measured == outcome.skipped == 0 \
            and not any(result.stderr.get(key) for key in keys)
        found.setdefault(result.commit_hash, []).append(outcome)
    return found


def export(conf: Config, commit: str, folder: Path) -> Path:
    """The commit's tree, unpacked under ``folder``: what the benchmarks import ``semantic`` from."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=conf.repo,
                             capture_output=True, check=True).stdout
    source = folder / f"source-{commit[:8]}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    return source


def suite(conf: Config, python: str, source: Path) -> List[str]:
    """The names of the checkout's benchmarks, discovered as asv does, in ``python``."""
    os.environ["ASV_PYTHONPATH"] = str(source)  # asv passes it on to the discovery process
    try:
        environments = list(get_environments(conf, [f"existing:{python}"]))
        return sorted(Benchmarks.discover(conf, get_repo(conf), environments, ["HEAD"]))
    finally:
        del os.environ["ASV_PYTHONPATH"]


def measured_names(conf: Config, machine: str) -> Dict[str, set]:
    """Commit hash -> the benchmarks ``machine`` has a result for there."""
    found: Dict[str, set] = {}
    for result in iter_results_for_machine(conf.results_dir, machine):
        found.setdefault(result.commit_hash, set()).update(result.get_all_result_keys())
    return found


def merge(unit_results: Path, results_dir: Path, machine: str) -> None:
    """Add one benchmark's results (a unit's scratch results dir) to the machine's result files."""
    target = results_dir / machine
    target.mkdir(parents=True, exist_ok=True)
    for path in (unit_results / machine).glob("*.json"):
        existing = target / path.name
        if path.name == "machine.json" or not existing.exists():
            if not existing.exists():
                shutil.copy2(path, existing)
            continue
        merged, new = json.loads(existing.read_text()), json.loads(path.read_text())
        for key in ("results", "durations"):
            merged.setdefault(key, {}).update(new.get(key, {}))
        existing.write_text(json.dumps(merged))
    shutil.copy2(unit_results / "benchmarks.json", results_dir / "benchmarks.json")


def job_home(home: Path) -> Dict[str, str]:
    """A HOME of one job's own, holding a copy of asv's machine file; the caches that live under HOME
    (built local models, CUDA's compiled kernels, XDG caches) stay where they are."""
    real = Path.home()
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy2(real / ".asv-machine.json", home / ".asv-machine.json")
    return {
        "HOME": str(home),
        "SEMANTIC_MODEL_CACHE": os.environ.get("SEMANTIC_MODEL_CACHE") or str(real / ".cache" / "semantic" / "models"),
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(real / ".cache"),
        "CUDA_CACHE_PATH": os.environ.get("CUDA_CACHE_PATH") or str(real / ".nv" / "ComputeCache"),
    }


def run_in_existing(conf: Config, config_json: dict, python: str, range_spec: str, machine: str,
                    steps: Optional[int], jobs: int, asv_args: List[str], bench: Optional[str] = None) -> int:
    """``asv run -E existing:python`` for each benchmark of the suite on each commit of the range that
    ``machine`` has no result of it for, each commit's package exported to a scratch folder first.
    ``jobs`` run at once, job i on GPU i (``CUDA_VISIBLE_DEVICES``); each into a scratch results dir,
    merged into the machine's as it ends, so a run stopped by a time limit resumes where it was.
    ``bench``: only the benchmarks whose name it matches (``re.search``). Returns asv's worst exit status."""
    commits = commits_in(conf, range_spec)
    if commits is None:
        raise SystemExit(f"--existing needs a git range, not {range_spec}")
    status = 0
    with tempfile.TemporaryDirectory(prefix="bench-existing-") as scratch_dir:
        scratch = Path(scratch_dir)
        names = [name for name in suite(conf, python, export(conf, commits[0], scratch))
                 if bench is None or re.search(bench, name)]
        done = measured_names(conf, machine)
        todo = [commit for commit in commits if set(names) - done.get(commit, set())]
        units = queue.SimpleQueue()
        for commit in pick_n(todo, steps) if steps else todo:
            source = export(conf, commit, scratch) if commit != commits[0] else scratch / f"source-{commit[:8]}"
            for name in names:
                if name not in done.get(commit, set()):
                    units.put((commit, source, name))
        print(f"{units.qsize()} benchmark(s) x commit(s) to measure, {jobs} at a time", flush=True)
        lock = threading.Lock()

        def work(job: int) -> None:
            nonlocal status
            env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(job)} if jobs > 1 else {}))
            if jobs > 1:  # every `asv run` rewrites ~/.asv-machine.json: concurrent ones read it half-written
                env.update(job_home(scratch / f"home-{job}"))
            while True:
                try:
                    commit, source, name = units.get_nowait()
                except queue.Empty:
                    return
                folder = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{commit[:8]}-"))
                unit_config = asv_dashboard.write_config(dict(config_json, results_dir=str(folder)), folder,
                                                         "asv.conf.json")
                run = subprocess.run(
                    asv_command(str(unit_config), "run", "-E", f"existing:{python}", "--set-commit-hash", commit,
                                "--machine", machine, "-b", f"^{re.escape(name)}(\\(|$)", *asv_args),
                    env=dict(env, ASV_PYTHONPATH=str(source)),  # asv drops PYTHONPATH, passes this on
                )
                with lock:
                    if (folder / "benchmarks.json").exists():
                        merge(folder, Path(conf.results_dir), machine)
                    status = max(status, run.returncode)

        threads = [threading.Thread(target=work, args=(job,)) for job in range(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return status


def report(conf: Config, machine: str, range_spec: str) -> int:
    """Print one line per commit and environment; return how many benchmarks failed on built commits."""
    measured = outcomes(conf, machine)
    commits = commits_in(conf, range_spec)
    if commits is None:
        commits = list(measured)
    print(f"\nasv results for machine {machine!r}, {len(commits)} commit(s) of {range_spec}:")
    print(f"{'commit':10} {'points measured':>15} {'n/a':>5} {'failed':>7}  environment / note")
    defects = 0
    for commit in commits:
        if commit not in measured:
            print(f"{commit[:8]:10} {'-':>15} {'-':>5} {'-':>7}  not measured (left out by --steps, or the run stopped)")
            continue
        for outcome in measured[commit]:
            if outcome.build_failed:
                print(f"{commit[:8]:10} {'-':>15} {'-':>5} {'-':>7}  {outcome.env}: BUILD FAILED, passed over "
                      "(asv's log above says why)")
                continue
            defects += len(outcome.failed)
            note = f"FAILED: {', '.join(sorted(set(outcome.failed)))}" if outcome.failed else ""
            print(f"{commit[:8]:10} {outcome.measured:>15} {outcome.skipped:>5} {len(outcome.failed):>7}  "
                  f"{outcome.env} {note}")
    return defects


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("range", nargs="?", default="ALL", help="asv's commit range (default: ALL)")
    parser.add_argument("--machine", help="the machine's name in the results (default: asv's, the host name)")
    parser.add_argument("--steps", type=int, help="measure at most N commits, spread over the range")
    parser.add_argument("--config", default="asv.conf.json")
    parser.add_argument("--existing", metavar="PYTHON",
                        help="measure in this interpreter (asv -E existing), each commit exported")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --existing: benchmarks run at once, job i on GPU i (default 1)")
    parser.add_argument("--bench", metavar="REGEX",
                        help="only the benchmarks whose name matches REGEX (asv's -b; with --existing, "
                             "where each benchmark is its own asv run, a -b after -- would not narrow the run)")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, asv_args = parser.parse_args(argv[:split]), argv[split + 1:]

    # asv builds virtualenvs from the first `pythonX.Y` on PATH for the version running it: this
    # interpreter's own folder first (a pyenv shim there may not serve that version).
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    machine = args.machine or Machine.get_unique_machine_name()
    conf_json = asv_dashboard.load_config(Path(args.config))
    reference = machine in asv_dashboard.reference_machines(conf_json)
    if reference:  # measured into the committed folder itself
        conf_json["results_dir"] = str(asv_dashboard.reference_dir(conf_json))
    else:  # next to the reference machines' results, so asv compare and publish see both
        asv_dashboard.sync(conf_json)
    with tempfile.TemporaryDirectory(prefix="bench-history-") as scratch:
        config = str(asv_dashboard.write_config(conf_json, Path(scratch), "asv.conf.json"))
        asv_dashboard.pin(Path(config), conf_json, machine)
        conf = Config.load(config)
        range_spec = absolute_range(args.range)
        if args.existing:
            status = run_in_existing(conf, conf_json, args.existing, range_spec, machine, args.steps, args.jobs,
                                     asv_args, args.bench)
        else:
            steps = ["--steps", str(args.steps)] if args.steps else []
            bench = ["-b", args.bench] if args.bench else []
            status = subprocess.run(asv_command(config, "run", "--skip-existing-commits", "--machine", machine,
                                                *steps, *bench, *asv_args, range_spec)).returncode
        # 2: something failed, which the report below sorts out; but asv's usage errors exit 2 too, and
        # then there is nothing to report on.
        if status not in (0, 2) or not os.path.exists(os.path.join(conf.results_dir, "benchmarks.json")):
            print(f"asv run exited {status} without results: see its output above", file=sys.stderr)
            return status or 1
        defects = report(conf, machine, range_spec)
    where = "the committed reference results" if reference else "this machine's results (git-ignored)"
    print(f"results: {conf.results_dir}/{machine}/ ({where})")
    if defects:
        print(f"{defects} benchmark point(s) failed on commits that built: benchmarks must skip "
              "(NotImplementedError in setup) what a commit does not have.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
