"""The command line as a new user first meets it: no TPU start-up noise on a host without TPU, long steps that say
what they do and for how long, readable reports, and bad arguments answered in one line with exit code 2."""

import io
import json
import os
import subprocess
import sys
import time

import pytest

from internvl_jax.cli import Working, main
from internvl_jax.config import to_hf_dict
from internvl_jax.presets import get_preset
from jax._src import hardware_utils

TPU_NOISE = ("libtpu", "TPU_", "host bounds", "worker hostname", "InitGoogle", "initialize backend")


@pytest.fixture(autouse=True)
def tpu_environment(monkeypatch):
    """main() fills in the libtpu variables of a host without TPU: give them back afterwards."""
    for name in ("TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)


def _run(*args, env_drop=()):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, "-m", "internvl_jax.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.skipif(hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0, reason="a TPU host")
def test_no_tpu_start_up_noise_and_plan_shows_its_compile_at_once():
    """libtpu is installed (requirements-test.txt); `info` starts JAX's backends with JAX_PLATFORMS unset, `plan`
    compiles for a TPU topology: neither prints libtpu's start-up errors. plan says what it compiles, for which
    slice, before the compile, and how long it took."""
    info = _run("info", "tiny-qwen2", env_drop=("JAX_PLATFORMS", "TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES"))
    assert info.returncode == 0 and info.stderr == "", info.stderr
    plan = _run("plan", "tiny-qwen2", "--chips", "v5e-4", "--seq-len", "64", env_drop=("TPU_HOST_BOUNDS",
                                                                                       "TPU_WORKER_HOSTNAMES"))
    assert plan.returncode == 0, plan.stderr
    assert not any(word in plan.stderr for word in TPU_NOISE), plan.stderr
    lines = plan.stderr.splitlines()
    assert lines[0] == ("compiling the train step for v5e-4 (v5e:2x2, mesh {'data': 1, 'fsdp': 4, 'tensor': 1}), "
                        "4 rows x 64 tokens ...")
    assert lines[-1].startswith("  done in ") and "compiled train step (v5e:2x2" in plan.stdout


def test_working_shows_the_step_at_once_then_elapsed_time_then_its_duration():
    out = io.StringIO()
    with Working("compiling", every=0.05, stream=out):
        assert out.getvalue() == "compiling ...\n"  # before any of the work
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "compiling ..." and lines[-1].startswith("  done in 0.")
    assert len(lines) >= 4 and all(line.startswith("  ... ") and line.endswith(" s") for line in lines[1:-1])
    failed = io.StringIO()
    with pytest.raises(RuntimeError), Working("loading", every=10, stream=failed):
        raise RuntimeError("disk gone")
    assert failed.getvalue() == "loading ...\n"  # no "done" for a step that failed


def _hf_folder(tmp_path, preset="InternVL3-1B"):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(get_preset(preset))))
    return str(tmp_path)


def _one_line_error(capsys, args, *messages):
    assert main(list(args)) == 2, args
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for message in messages:
        assert message in err, (args, err)
    return err


def test_info_on_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    for path in (str(tmp_path / "InternVL2_5-8B"), "./nope", "ckpts/a/b", str(tmp_path / "config.json")):
        err = _one_line_error(capsys, ["info", path], f"{path} does not exist")
        assert "unknown preset" not in err
    _one_line_error(capsys, ["info", "InternVL9-1B"], "unknown preset 'InternVL9-1B'")


def test_info_prints_counts_with_separators_and_names_the_native_template(tmp_path, capsys):
    assert main(["info", "tiny-qwen2"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 156,000" in out.splitlines() and "; 1 token per tile" in out
    assert main(["info", _hf_folder(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "template: None" not in out and "template: transformers-native chat template" in out
    assert "; 256 tokens per tile" in out


def test_plan_takes_a_checkpoint_folder_as_info_does(tmp_path, capsys):
    assert main(["plan", _hf_folder(tmp_path), "--chips", "h100-8", "--seq-len", "1024"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"plan: {tmp_path}, bfloat16") and "verdict: fits" in out


def test_plan_warns_when_rows_exceed_the_models_positions(capsys):
    assert main(["plan", "tiny-qwen2", "--chips", "h100-8"]) == 0
    out = capsys.readouterr().out.splitlines()
    warning = "warning: 2048 tokens per row exceed the model's 128 positions (max_position_embeddings)"
    assert any(line.startswith(warning) and "--seq-len 128 or less" in line for line in out)
    assert main(["plan", "tiny-qwen2", "--chips", "h100-8", "--seq-len", "128"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_plan_bad_arguments_are_one_line(capsys):
    cases = [(("--tiles", "-1"), ("tiles is -1: expected 0 or more",)),
             (("--batch", "0"), ("batch is 0: expected a positive number",)),
             (("--seq-len", "0"), ("seq_len is 0",)),
             (("--step-time", "0"), ("step_time is 0.0: expected positive seconds",)),
             (("--chips", "v5p-0"), ("chips 'v5p-0': a slice of 0 chips; expected at least one, e.g. v5p-16",)),
             (("--chips", "h100-0"), ("a slice of 0 chips",)),
             (("--chips", "v5p:0x2x2"), ("a torus dimension is 0",)),
             (("--chips", "h100-8", "--mesh", "3,3,1"), ("mesh {'data': 3, 'fsdp': 3, 'tensor': 1} needs 9 devices",)),
             (("--chips", "h100-8", "--mesh", "0,-1,1"), ("mesh sizes [0, -1, 1]: expected positive sizes",))]
    for args, messages in cases:
        err = _one_line_error(capsys, ["plan", "tiny-qwen2", "--no-compile", *args], *messages)
        assert "mesh mesh" not in err
