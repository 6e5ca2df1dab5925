"""Malformed checkpoints: every mutation of a valid tiny checkpoint (both layouts) raises the documented error, naming
the file and the key, through ``load_pretrained`` and, for a representative subset, the CLI (exit 2, one line on
stderr, nothing at the destination); nothing loads as silently wrong numbers.

Documented errors: :class:`CheckpointError` for tensors, safetensors headers, the index and orbax folders;
:class:`ConfigError` for config.json; ``OSError`` for images. Both are ``ValueError`` subclasses, which the CLI
prints as one line with exit code 2.

Dtypes: float16, bfloat16, float32 and float64 tensors are all legitimate (cast to the params' dtype on loading);
an integer or boolean tensor where a float parameter is expected is a broken file and raises.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import convert.load
from convert.load import load_pretrained
from convert.safetensors_io import INDEX, CheckpointError
from internvl_jax.cli import main
from internvl_jax.config import ConfigError, config_from_dict
from internvl_jax.model import abstract_params
from original_layout import original_checkpoint
from reference import tiny_internvl

LAYOUTS = ["hf", "original"]
FILE = "model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def cached_abstract_params():
    """The abstract params of a config are a pure function of it: computed once per config, so that hundreds of
    mutated checkpoints go through the whole of ``load_pretrained`` in seconds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert.load, "abstract_params", functools.cache(abstract_params))
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{layout: (folder, tensors, config dict)} of one valid tiny checkpoint per layout (never modified)."""
    out = {}
    for layout in LAYOUTS:
        folder = tmp_path_factory.mktemp(layout) / "good"
        if layout == "hf":
            tiny_internvl("qwen2").save_pretrained(folder)
        else:
            original_checkpoint("internlm2", folder)
        out[layout] = folder, load_file(folder / FILE), json.loads((folder / "config.json").read_text())
    return out


def _write(folder, tensors=None, config=None, header=None):
    """A checkpoint at ``folder`` (replacing any): the tensors, or the raw ``header`` bytes plus data section copied
    from another file (``header=(new header object, source file)``), and config.json (a dict, a string, or bytes)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if header is not None:
        table, source = header
        raw = source.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        head = json.dumps(table).encode()
        (folder / FILE).write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])
    else:
        save_file(tensors, folder / FILE)
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    return folder


def _raises(error, folder, *names) -> str:
    """Load ``folder``; check it raises ``error`` whose one-line message names each of ``names``; the message."""
    with pytest.raises(error) as info:
        load_pretrained(str(folder))
    message = str(info.value)
    assert "\n" not in message and all(str(n) in message for n in names), message
    return message


# --- every tensor, every way of breaking it -------------------------------------------------------------------


def _renamed(key: str, layers: int) -> str:
    """``key`` moved to a layer the model lacks (index ``layers``), or, outside the layers, to a module it lacks."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layer", "layers") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 1] + [str(layers)] + parts[i + 2:])
    return ".".join(parts[:-1] + ["extra_" + parts[-1]])


def _mutations(key: str, t: np.ndarray, layers: int) -> dict:
    """{mutation: (new key or None for removed, new tensor)} for one tensor. A transposed tensor whose shape reads the
    same backwards (a square matrix, a vector) cannot be told from the original by its header: not a case."""
    out = {
        "dimension dropped": (key, np.ascontiguousarray(t[..., 0])),
        "dimension added": (key, t[..., None]),
        "integer dtype": (key, t.astype(np.int32)),
        "removed": (None, None),
        "renamed": (_renamed(key, layers), t),
    }
    if t.shape != t.shape[::-1]:
        out["transposed"] = (key, np.ascontiguousarray(t.T))
    return out


MUTATIONS = ["transposed", "dimension dropped", "dimension added", "integer dtype", "removed", "renamed"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_every_tensor_mutation_raises_naming_the_file_and_key(tmp_path, checkpoints, layout, mutation):
    good, tensors, config = checkpoints[layout]
    layers = max(config["vision_config"]["num_hidden_layers"],
                 config.get("llm_config", config.get("text_config"))["num_hidden_layers"])
    folder = tmp_path / "ckpt"
    cases = 0
    for key, t in tensors.items():
        case = _mutations(key, t, layers).get(mutation)
        if case is None:
            continue
        new_key, new = case
        mutated = {k: v for k, v in tensors.items() if k != key} | ({new_key: new} if new_key else {})
        _write(folder, mutated, config)
        # a removed tensor is named by its key in the checkpoint folder; any other by its key in its file
        _raises(CheckpointError, folder, folder / ("" if new_key is None else FILE), new_key or key)
        cases += 1
    assert cases


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_other_float_dtypes_are_cast_on_loading(tmp_path, checkpoints, dtype):
    good, tensors, config = checkpoints["hf"]
    folder = _write(tmp_path / "ckpt", {k: v.astype(dtype) for k, v in tensors.items()}, config)
    _, params = load_pretrained(str(folder))
    embed = params["language_model"]["embed_tokens"]
    expected = tensors["language_model.model.embed_tokens.weight"].astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(embed), expected)


# --- safetensors headers ----------------------------------------------------------------------------------------


def _header(path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])


def _header_cases(table: dict) -> dict:
    """{case: (damaged header, names the message must hold)}."""
    names = sorted(k for k in table if k != "__metadata__")
    first = names[0]
    cases = {"a JSON list": ([table[k] for k in names], ["JSON list"])}
    for field in ("dtype", "shape", "data_offsets"):
        entry = {k: v for k, v in table[first].items() if k != field}
        cases[f"no {field}"] = ({**table, first: entry}, [first, field])
    # two tensors of one byte size made to share their bytes
    a, b = next((a, b) for a in names for b in names
                if a < b and np.diff(table[a]["data_offsets"]) == np.diff(table[b]["data_offsets"]))
    cases["overlapping offsets"] = ({**table, b: {**table[b], "data_offsets": table[a]["data_offsets"]}}, [a, b])
    last = max(names, key=lambda k: table[k]["data_offsets"][1])
    begin, end = table[last]["data_offsets"]
    cases["offsets past the end"] = ({**table, last: {**table[last], "data_offsets": [begin + 8, end + 8]}},
                                     [last, "corrupt or truncated"])
    return cases


HEADER_CASES = ["a JSON list", "no dtype", "no shape", "no data_offsets", "overlapping offsets", "offsets past the end"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", HEADER_CASES)
def test_damaged_header_raises_naming_the_file_and_tensor(tmp_path, checkpoints, layout, case):
    good, _, config = checkpoints[layout]
    table, names = _header_cases(_header(good / FILE))[case]
    folder = _write(tmp_path / "ckpt", config=config, header=(table, good / FILE))
    _raises(CheckpointError, folder, folder / FILE, *names)


def test_an_index_that_does_not_parse_is_named(tmp_path, checkpoints):
    good, tensors, config = checkpoints["hf"]
    folder = _write(tmp_path / "ckpt", tensors, config)
    (folder / INDEX).write_text('{"weight_map": {')
    _raises(CheckpointError, folder, folder / INDEX, "not valid JSON")


# --- config.json --------------------------------------------------------------------------------------------------


class _Recording(dict):
    """A config object that logs the dotted keys the parser reads (``get`` and ``[]``)."""

    def __init__(self, d: dict, path: str, log: set):
        super().__init__({k: _recording(v, f"{path}{k}", log) for k, v in d.items()})
        self.path, self.log = path, log

    def get(self, key, default=None):
        self.log.add(self.path + key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.log.add(self.path + key)
        return super().__getitem__(key)


def _recording(value, path: str, log: set):
    return _Recording(value, path + ".", log) if isinstance(value, dict) else value


def _numeric_leaves(value, path=()):
    """The paths (key tuples, list indices included) of every number in a parsed JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numeric_leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numeric_leaves(v, path + (i,))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path


def _edited(config: dict, path: tuple, value=None, remove=False) -> dict:
    out = json.loads(json.dumps(config))
    *parents, last = path
    target = functools.reduce(lambda d, k: d[k], parents, out)
    if remove:
        del target[last]
    else:
        target[last] = value
    return out


REQUIRED = {
    "hf": ["vision_config", "text_config"],
    "original": ["vision_config", "llm_config"],
}
SECTION_REQUIRED = {"vision_config": ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"],
                    "llm": ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]}


def _required_keys(layout: str) -> list[tuple]:
    llm = REQUIRED[layout][1]
    return ([(k,) for k in REQUIRED[layout]] + [("vision_config", k) for k in SECTION_REQUIRED["vision_config"]]
            + [(llm, k) for k in SECTION_REQUIRED["llm"]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_json_that_is_a_string_or_not_utf8_is_named(tmp_path, checkpoints, layout):
    good, tensors, config = checkpoints[layout]
    folder = _write(tmp_path / "ckpt", tensors, "InternVL")
    _raises(ConfigError, folder, folder / "config.json", "a string, expected a JSON object")
    folder = _write(tmp_path / "ckpt", tensors, b"\xff\xfe" + json.dumps(config).encode("utf-16-le"))
    _raises(ConfigError, folder, folder / "config.json", "not UTF-8")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_json_without_a_required_key_names_it(tmp_path, checkpoints, layout):
    good, tensors, config = checkpoints[layout]
    for path in _required_keys(layout):
        folder = _write(tmp_path / "ckpt", tensors, _edited(config, path, remove=True))
        _raises(ConfigError, folder, folder / "config.json", ".".join(path))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_json_numbers_given_as_strings_are_named(tmp_path, checkpoints, layout):
    """Every number the parser reads, given as a string (``"hidden_size": "64"``), raises naming its key; numbers
    it does not read leave the config as it was (the parser's reads are recorded on the valid config)."""
    good, tensors, config = checkpoints[layout]
    read: set = set()
    baseline = config_from_dict(_Recording(config, "", read))
    assert "vision_config.hidden_size" in read
    for path in _numeric_leaves(config):
        key = ".".join(p for p in path if isinstance(p, str))  # a list element is named by its list's key
        quoted = str(functools.reduce(lambda d, k: d[k], path, config))
        edited = _edited(config, path, quoted)
        if key in read:
            folder = _write(tmp_path / "ckpt", tensors, edited)
            _raises(ConfigError, folder, folder / "config.json", key, json.dumps(quoted))  # what it found
        else:
            assert config_from_dict(edited) == baseline, key


# --- orbax folders and images -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoints):
    dst = tmp_path_factory.mktemp("orbax") / "converted"
    assert main(["convert", str(checkpoints["hf"][0]), str(dst)]) == 0
    return dst


def _damage_orbax(converted, folder, kind: str):
    """A copy of ``converted`` at ``folder`` with one parameter's folder removed or one of its chunks cut short;
    returns the file the error must name."""
    shutil.copytree(converted, folder)
    param = folder / "params" / "language_model.layers.mlp.up_proj.kernel"
    if kind == "missing parameter folder":
        shutil.rmtree(param)
        return param
    chunk = param / "1.0.0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    return chunk


@pytest.mark.parametrize("kind", ["missing parameter folder", "truncated chunk"])
def test_damaged_orbax_folder_names_the_file(tmp_path, converted, kind):
    damaged = _damage_orbax(converted, tmp_path / "ckpt", kind)
    _raises(CheckpointError, tmp_path / "ckpt", damaged, "language_model/layers/mlp/up_proj/kernel")


def test_an_image_over_the_decompression_bomb_limit_names_the_file_and_setting(tmp_path, monkeypatch):
    from PIL import Image

    from internvl_jax.processing.images import load_image

    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 is over twice the limit: PIL refuses it
    with pytest.raises(OSError, match="PIL.Image.MAX_IMAGE_PIXELS") as info:
        load_image(tmp_path / "big.png")
    assert str(tmp_path / "big.png") in str(info.value)


# --- through the CLI ----------------------------------------------------------------------------------------------


def _cli_cases(checkpoints, converted, scratch) -> list:
    """(argv without the destination, or with None standing for it, names) of a representative subset."""
    good, tensors, config = checkpoints["original"]
    key = "language_model.model.layers.0.attention.wqkv.weight"
    transposed = _write(scratch / "transposed", {**tensors, key: np.ascontiguousarray(tensors[key].T)}, config)
    table, _ = _header_cases(_header(good / FILE))["a JSON list"]
    listed = _write(scratch / "list", config=config, header=(table, good / FILE))
    hf_good, hf_tensors, hf_config = checkpoints["hf"]
    stringly = _write(scratch / "string", hf_tensors,
                      _edited(hf_config, ("text_config", "num_attention_heads"), "4"))
    headless = _write(scratch / "headless", hf_tensors, _edited(hf_config, ("text_config", "num_attention_heads"),
                                                                remove=True))
    damaged = scratch / "orbax"
    _damage_orbax(converted, damaged, "truncated chunk")
    return [
        (["convert", transposed], [transposed / FILE, key, f"has shape {list(tensors[key].shape[::-1])}"]),
        (["convert", listed], [listed / FILE, "JSON list"]),
        (["convert", stringly], [stringly / "config.json", "text_config.num_attention_heads"]),
        (["info", headless], [headless / "config.json", "text_config.num_attention_heads is missing"]),
        (["export", damaged], [damaged / "params", "1.0.0"]),
    ]


def test_cli_prints_one_line_exits_2_and_writes_nothing(tmp_path, capsys, checkpoints, converted):
    for argv, names in _cli_cases(checkpoints, converted, tmp_path / "in"):
        dst = tmp_path / "out" / "dst"
        command = [str(a) for a in argv] + ([str(dst)] if argv[0] != "info" else [])
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"internvl-jax {argv[0]}: error: ") and "\n" not in err, err
        assert all(str(n) in err for n in names), err
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out"), os.listdir(tmp_path / "out")


def test_cli_subprocess_has_no_traceback(tmp_path, checkpoints):
    """As users run it: a damaged tensor and a config.json that is not UTF-8, one line each on stderr."""
    good, tensors, config = checkpoints["hf"]
    key = "vision_tower.encoder.layer.0.layernorm_before.weight"
    folder = _write(tmp_path / "ckpt", {**tensors, key: tensors[key].reshape(-1, 1)}, config)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_bytes(b"\xff" + json.dumps(config).encode())
    for argv, message in [(["convert", str(folder), str(tmp_path / "dst")], key),
                          (["info", str(tmp_path / "bad")], "not UTF-8")]:
        out = subprocess.run([sys.executable, "-m", "internvl_jax.cli", *argv], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr and message in lines[0], out.stderr
    assert not (tmp_path / "dst").exists()
