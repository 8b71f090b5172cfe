"""semantic.models.fetch (processes fetching at once) and semantic.cpu_blas (OpenBLAS before MLX), each
in fresh processes: both are about what happens at a process's start."""

import os
import pathlib
import subprocess
import sys

import pytest

from semantic.domain.errors import InvalidRequestError
from semantic.models import MODELS, resolve
from semantic.testing.local_models import build_local_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python(code: str, **env):
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen([sys.executable, "-c", code], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out, err


def test_names_and_folders_resolve_and_anything_else_is_refused(tmp_path):
    assert set(MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
    local = build_local_model("tiny-llama", tmp_path / "tiny")
    assert resolve(str(local)) == local  # any mlx-lm folder
    for bad in ("smollm3", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(InvalidRequestError, match="neither a model name"):
            resolve(bad)


def test_processes_fetching_at_once_convert_once(tmp_path):
    """Two processes fetch into an empty cache together: one downloads and converts while the other waits
    on the lock, then both return the same complete folder; no temp folder is left, a killed fetch's neither."""
    (tmp_path / ".smollm2-135m-instruct.tmp-killed").mkdir()  # what a fetch killed midway leaves
    code = "from semantic.models import fetch; print(fetch('smollm2-135m-instruct'))"
    runs = [python(code, SEMANTIC_MODEL_CACHE=str(tmp_path)) for _ in range(2)]
    results = [finished(run) for run in runs]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert paths == {str(tmp_path / "smollm2-135m-instruct")}
    assert sum("converting" in err for _, err in results) == 1
    assert sorted(p.name for p in (tmp_path / "smollm2-135m-instruct").iterdir()) == [
        "config.json", "model.safetensors", "semantic_model.json", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_openblas_is_loaded_before_mlx_or_its_absence_is_said():
    from semantic import cpu_blas

    report = "import semantic.cpu_blas as c, mlx.core; print(c.OPENBLAS)"
    out, err = finished(python(report))
    if cpu_blas._find() is None:
        assert out.strip() == "None" and cpu_blas.INSTALL_HINT in err
        return
    assert "openblas" in out.lower() and err == ""
    out, err = finished(python(report, SEMANTIC_OPENBLAS="0"))  # switched off
    assert out.strip() == "None"
    out, err = finished(python("import mlx.core; import semantic.cpu_blas as c; print(c.OPENBLAS)"))
    assert out.strip() == "None" and "too late" in err  # after mlx.core it cannot help, and says so
