"""The asv dashboard as this project publishes it (docs/benchmarks.md, "Reading the dashboard"):

* the reference machines' committed results (``benchmarks/results/``, the config's
  ``reference_results_dir``) are copied next to this machine's own results under ``.asv/results/``
  (git-ignored), so both are drawn and ``asv compare`` finds both;
* benchmarks whose unit says higher is better (GB/s, ratio) are left out of the Regressions page:
  asv takes every number as lower-is-better, so their improvements would be listed as regressions;
* the front page's thumbnails draw one machine, the one with the most commits measured (asv averages
  every machine into them: the H200's times drew a false 3x dip into the CPU history);
* the JavaScript and CSS that asv's pages load from CDNs are served from the dashboard itself
  (``vendor/``: pinned npm packages, fetched once from the npm registry, checked against npm's
  sha512, licences kept), so ``asv preview`` or any static server draws the graphs offline.

    python tools/asv_dashboard.py publish [--config asv.conf.json]   # sync, asv publish, vendor
    python tools/asv_dashboard.py sync                               # only copy the reference results
    python tools/asv_dashboard.py pin MACHINE                        # describe MACHINE to asv (below)

``pin``: asv records a machine's details (os, ram, cpu, ...) in every result, and draws results whose
details differ as separate series. A reference machine's details are the committed ``machine.json``;
``pin`` registers exactly those with ``asv machine`` (whatever the kernel or RAM reads today), so a
backfill or ``make bench MACHINE=ref-cpu-2core`` continues the same series.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

from asv.util import load_json

ROOT = Path(__file__).resolve().parent.parent
PATH_KEYS = ("repo", "benchmark_dir", "results_dir", "html_dir", "env_dir", "reference_results_dir")
HIGHER_IS_BETTER_UNITS = ("GB/s", "ratio")
"""Units of benchmarks where a larger number is better. asv has no direction per benchmark (asv issue
#1617); a new track in one of these units is left out of regression detection by this rule."""

NPM_REGISTRY = os.environ.get("npm_config_registry", "https://registry.npmjs.org/").rstrip("/")
VENDOR_CACHE = ROOT / ".asv" / "vendor-cache"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # npm's "dist.integrity" of the tarball
    licence: str  # SPDX id, from package.json or the file's header where package.json has none
    extra: Tuple[str, ...] = ()  # files the loaded ones refer to (bootstrap's fonts)

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version}"


JQUERY = Package("jquery", "3.3.1", "sha512-Ubldcmxp5np52/ENotGxlLe6aGMvmF4R8S6tZjsP6Knsaxd/xp3Zrh50cG93lR6nPXyUFwzN3ZSOQI0wRJNdGg==", "MIT")
FLOT = Package("flot", "0.8.3", "sha512-xg2otcTJDvS+ERK+my4wxG/ASq90QURXtoM4LhacCq0jQW2jbyjdttbRNqU2cPykrpMvJ6b2uSp6SAgYAzj9tQ==", "MIT")
ORDERBARS = Package("flot-orderbars", "1.0.0", "sha512-Jv51fvzevUjNXEeozpwEKfPjhiZhfiJddv0WHjduUTCmSF+7T5K7C9c9Y1wIVmUhDBv5fLMjgbwKecT0GIKPZA==", "MIT")
STUPIDTABLE = Package("stupid-table-plugin", "1.1.3", "sha512-2Vk7XouQPxUQPRe9w0Fu7ZZ8kHLK7rDoLMsCgtKxRNJ7f4dSOGvW9CkHsq5wD6QsaEnWoyLBYH3xOEsrK3yWBg==", "MIT")
MD5 = Package("blueimp-md5", "2.19.0", "sha512-DRQrD6gJyy8FbiE4s+bDoXS9hiW3Vbx5uCdwvcCf3zLHL+Iv7LtGHLpr+GZV8rHG8tK766FGYBwRbu8pELTt+w==", "MIT")
BOOTSTRAP = Package("bootstrap", "3.1.1", "sha512-TAzqS8E/ISpVHP29gYhy+1NSV+FJwApDVQhDfgLYsIuUDJiqJzH2DfORN5tiu+Ie2iBLrzEG34t4Rf465cigqg==", "MIT",
                    extra=tuple(f"dist/fonts/glyphicons-halflings-regular.{ext}" for ext in ("eot", "svg", "ttf", "woff")))

CDN_FILES: Dict[str, Tuple[Package, str]] = {
    # asv 0.6.6's www/index.html -> the same library's file in its npm package. flot's npm package has
    # the unminified sources only, and npm has stupidtable 1.1.3 but not the CDN's 1.0.1 (same API).
    "https://code.jquery.com/jquery-3.3.1.min.js": (JQUERY, "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js": (FLOT, "jquery.flot.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js": (FLOT, "jquery.flot.time.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js": (FLOT, "jquery.flot.selection.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js": (FLOT, "jquery.flot.categories.js"),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": (ORDERBARS, "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": (STUPIDTABLE, "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": (MD5, "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": (BOOTSTRAP, "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": (BOOTSTRAP, "dist/css/bootstrap.min.css"),
}
REMOTE_TAG = re.compile(r'<(script|link)\b[^>]*?\b(?:src|href)="(https?://[^"]+)"[^>]*>')
LICENCE_FILE = re.compile(r"^package/(LICEN[CS]E|COPYING)[^/]*$", re.IGNORECASE)


class DashboardError(Exception):
    """Something the user can fix (no network to npm yet, an asv whose pages load unknown libraries)."""


# ---- configuration ---------------------------------------------------------------------------------
def load_config(config: Path) -> dict:
    """asv.conf.json with its paths made absolute (asv reads them relative to the config's folder)."""
    conf = load_json(str(config), js_comments=True)
    base = config.resolve().parent
    for key in PATH_KEYS:
        if conf.get(key):
            conf[key] = str((base / conf[key]).resolve())
    return conf


def write_config(conf: dict, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(conf, indent=2))
    return path


def reference_dir(conf: dict) -> Optional[Path]:
    folder = conf.get("reference_results_dir")
    return Path(folder) if folder else None


def reference_machines(conf: dict) -> List[str]:
    folder = reference_dir(conf)
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob("*/machine.json"))


def higher_is_better(results_dir: Path) -> List[str]:
    """Names of the benchmarks whose unit says larger is better, from the suite's benchmarks.json."""
    path = results_dir / "benchmarks.json"
    if not path.exists():
        return []
    benchmarks = load_json(str(path), api_version=2)
    return sorted(name for name, b in benchmarks.items()
                  if name != "version" and b.get("unit") in HIGHER_IS_BETTER_UNITS)


def publish_config(conf: dict) -> dict:
    """The config ``asv publish`` runs with: the higher-is-better benchmarks' regression detection
    off (``regressions_first_commits``: null), by unit, so a new GB/s or ratio track needs no edit."""
    first_commits = dict(conf.get("regressions_first_commits", {}))
    for name in higher_is_better(Path(conf["results_dir"])):
        first_commits[f"^{re.escape(name)}(\\(|$)"] = None  # asv matches name(params)
    return dict(conf, regressions_first_commits=first_commits)


# ---- reference machines ----------------------------------------------------------------------------
def sync(conf: dict) -> List[str]:
    """Copy the reference machines' results into the results dir (theirs win over older copies; other
    machines' files are kept). Returns the machines copied."""
    source, target = reference_dir(conf), Path(conf["results_dir"])
    machines = reference_machines(conf)
    if source is None or source.resolve() == target.resolve():
        return machines
    target.mkdir(parents=True, exist_ok=True)
    for machine in machines:
        shutil.copytree(source / machine, target / machine, dirs_exist_ok=True)
    if not (target / "benchmarks.json").exists() and (source / "benchmarks.json").exists():
        shutil.copy2(source / "benchmarks.json", target / "benchmarks.json")
    return machines


def pin(config: Path, conf: dict, machine: str) -> bool:
    """Register ``machine`` with asv: a reference machine with its committed details, any other with
    this host's (asv fills a new name's details only from the entry of the host's own name). Returns
    whether ``machine`` is a reference machine."""
    asv = [sys.executable, "-m", "asv", "--config", str(config), "machine", "--yes"]
    subprocess.run(asv, check=True, capture_output=True)
    if machine not in reference_machines(conf):
        subprocess.run(asv + ["--machine", machine], check=True, capture_output=True)
        return False
    details = json.loads((reference_dir(conf) / machine / "machine.json").read_text())
    options = [f"--{key}={details[key]}" for key in ("os", "arch", "cpu", "num_cpu", "ram")]
    subprocess.run(asv + ["--machine", machine, *options], check=True, capture_output=True)
    return True


# ---- the published pages' libraries ----------------------------------------------------------------
def tarball(package: Package, cache: Path = VENDOR_CACHE) -> bytes:
    """The package's npm tarball, from the cache or the registry, checked against the pinned sha512."""
    path = cache / f"{package.folder}.tgz"
    algorithm, expected = package.integrity.split("-", 1)

    def matches(data: bytes) -> bool:
        return base64.b64encode(hashlib.new(algorithm, data).digest()).decode() == expected

    if path.exists() and matches(path.read_bytes()):
        return path.read_bytes()
    url = f"{NPM_REGISTRY}/{package.name}/-/{package.name}-{package.version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as error:
        raise DashboardError(
            f"cannot fetch {package.name}@{package.version} from the npm registry ({url}: {error}). The "
            f"dashboard serves asv's JavaScript libraries itself; they are fetched once and kept in {cache}: "
            "run `make dashboard` once where registry.npmjs.org is reachable (or set npm_config_registry "
            "to a mirror)") from error
    if not matches(data):
        raise DashboardError(f"{url} does not match its pinned {algorithm} ({package.integrity}): not installed")
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def vendor(html: Path, cache: Path = VENDOR_CACHE) -> List[Package]:
    """Point index.html's CDN <script>/<link> tags at copies under ``html/vendor/<package>-<version>/``,
    with each package's licence files and a LICENSES.md listing what was copied from where."""
    index = html / "index.html"
    page = index.read_text()
    urls = [match.group(2) for match in REMOTE_TAG.finditer(page)]
    unknown = sorted(set(urls) - set(CDN_FILES))
    if unknown:
        raise DashboardError(f"asv's index.html loads {', '.join(unknown)}, which tools/asv_dashboard.py "
                             "has no npm source for: add it to CDN_FILES (a newer asv?)")
    packages = sorted({CDN_FILES[url][0] for url in urls}, key=lambda p: p.name)
    for package in packages:
        wanted = {f"package/{CDN_FILES[url][1]}" for url in urls if CDN_FILES[url][0] == package}
        wanted |= {f"package/{name}" for name in package.extra}
        with tarfile.open(fileobj=io.BytesIO(tarball(package, cache))) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and (m.name in wanted or LICENCE_FILE.match(m.name))]
            missing = wanted - {m.name for m in members}
            if missing:
                raise DashboardError(f"{package.folder}'s npm package has no {', '.join(sorted(missing))}")
            for member in members:
                target = html / "vendor" / package.folder / PurePosixPath(member.name).relative_to("package")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())

    def local(match: re.Match) -> str:
        package, name = CDN_FILES[match.group(2)]
        path = f"vendor/{package.folder}/{name}"
        if match.group(1) == "script":  # keeps asv's onerror handler; the CDN's integrity is of another file
            return f'<script src="{path}" onerror="js_load_failure()">'
        return f'<link rel="stylesheet" href="{path}">'

    index.write_text(REMOTE_TAG.sub(local, page))
    lines = ["# Libraries of this dashboard", "",
             "asv's pages load these from CDNs; this project serves copies from its npm packages "
             "(tools/asv_dashboard.py).", "", "| package | version | licence | source | sha512 (npm) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p.name} | {p.version} | {p.licence} | {NPM_REGISTRY}/{p.name}/-/{p.name}-{p.version}.tgz "
              f"| {p.integrity} |" for p in packages]
    (html / "vendor" / "LICENSES.md").write_text("\n".join(lines) + "\n")
    return packages


def summaries_of_one_machine(html: Path) -> Optional[str]:
    """Redraw each front-page thumbnail (``graphs/summary/NAME.json``) from the graphs of the machine
    with the most commits measured: per commit, the geometric mean over the benchmark's parameter
    points and environments there, as asv's own summary takes it over everything. Returns the machine."""
    index = json.loads((html / "index.json").read_text())
    counts = {}
    for path in (html / "graphs").glob("**/*.json"):
        machine = next((part[len("machine-"):] for part in path.parts if part.startswith("machine-")), None)
        if machine is not None:
            counts[machine] = max(counts.get(machine, 0), len(json.loads(path.read_text())))
    machines = [m for m in index["params"].get("machine", []) if m in counts]
    if len(machines) < 2:
        return None  # asv's summary already draws the one machine there is
    machine = max(machines, key=lambda m: counts[m])
    for summary in (html / "graphs" / "summary").glob("*.json"):
        values: Dict[int, List[float]] = {}
        for graph in html.glob(f"graphs/**/machine-{glob_escape(machine)}/**/{glob_escape(summary.name)}"):
            for revision, value in json.loads(graph.read_text()):
                points = value if isinstance(value, list) else [value]
                values.setdefault(revision, []).extend(v for v in points if v is not None and v > 0)
        drawn = [[revision, math.exp(sum(map(math.log, vs)) / len(vs))] for revision, vs in sorted(values.items()) if vs]
        summary.write_text(json.dumps(drawn))
    return machine


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def publish(config: Path, asv_args: List[str] = ()) -> Path:
    """sync + ``asv publish`` (higher-is-better benchmarks out of regression detection) + vendor."""
    conf = load_config(config)
    sync(conf)
    with tempfile.TemporaryDirectory(prefix="asv-publish-") as scratch:
        derived = write_config(publish_config(conf), Path(scratch), "asv.conf.json")
        subprocess.run([sys.executable, "-m", "asv", "--config", str(derived), "publish", *asv_args], check=True)
    html = Path(conf["html_dir"])
    summaries_of_one_machine(html)
    vendor(html)
    return html


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "asv.conf.json")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("publish", help="sync, asv publish, serve the libraries from the dashboard")
    commands.add_parser("sync", help="copy the reference machines' results into the results dir")
    pinned = commands.add_parser("pin", help="register a machine's details with asv")
    pinned.add_argument("machine")
    args = parser.parse_args(argv)
    conf = load_config(args.config)
    try:
        if args.command == "publish":
            html = publish(args.config)
            print(f"Dashboard: {html}/index.html\nServe it with: asv preview (http://127.0.0.1:8080), or any "
                  "static web server (file:// cannot load its data); it needs no network.")
        elif args.command == "sync":
            print(f"copied {', '.join(sync(conf)) or 'nothing'} into {conf['results_dir']}")
        else:
            kind = "reference machine, committed details" if pin(args.config, conf, args.machine) else "this host's details"
            print(f"asv machine {args.machine}: {kind}")
    except DashboardError as error:
        print(f"asv_dashboard: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
