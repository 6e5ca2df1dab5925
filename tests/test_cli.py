"""The command line, run as users run it (subprocess)."""

import json
import subprocess
import sys

from internvl_jax.config import to_hf_dict
from internvl_jax.model import param_count
from internvl_jax.presets import get_preset


def run(*args):
    return subprocess.run([sys.executable, "-m", "internvl_jax.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_prints_the_exact_parameter_count_of_a_preset():
    out = run("info", "InternVL2_5-8B")
    assert out.returncode == 0, out.stderr
    assert f"parameters: {param_count(get_preset('InternVL2_5-8B')):,}" in out.stdout.splitlines()
    assert "language model: internlm2" in out.stdout


def test_info_reads_a_checkpoint_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(get_preset("InternVL3-1B"))))
    out = run("info", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"parameters: {param_count(get_preset('InternVL3-1B')):,}" in out.stdout


def test_train_bad_input_is_one_line_without_traceback(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    ready = ("train", "internvl2_5_stage2", f"workdir={tmp_path}", f"init={tmp_path}", f"data.meta={tmp_path}/meta.json")
    cases = {("train", "demo", "optim.lrr=1"): "did you mean 'lr'",
             ("train", "nope"): "unknown train config",
             ("train", "demo", "steps=many"): "steps=many: expected int",
             ("train", "internvl2_5_stage2", f"workdir={tmp_path}"): "give init=PATH",
             ("train", "internvl2_5_stage2", f"workdir={tmp_path}", f"init={tmp_path}"): "data.meta is not set",
             (*ready, "data.rows=12", "cpu_devices=8"): "data.rows=12 (12 rows per micro-batch with accum_steps=1) "
                                                        "does not split over the 8 batch shards of mesh='1,-1,1'"}
    for args, message in cases.items():
        out = run(*args)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert message in out.stderr, out.stderr


def test_bad_input_is_one_line_without_traceback(tmp_path):
    for args in (("info", "InternVL9-1B"), ("info", str(tmp_path))):
        out = run(*args)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no config.json" in run("info", str(tmp_path)).stderr


def test_export_converts_between_layouts(tmp_path):
    import torch
    from safetensors.torch import load_file

    from reference import tiny_internvl

    ref = tiny_internvl("qwen2")
    ref.save_pretrained(tmp_path / "src")
    out = run("export", str(tmp_path / "src"), str(tmp_path / "orig"), "--layout", "original", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    back = run("export", str(tmp_path / "orig"), str(tmp_path / "hf"), "--layout", "hf", "--dtype", "float32")
    assert back.returncode == 0, back.stderr
    src, hf = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(src) == sorted(hf) and all(torch.equal(src[k], hf[k]) for k in src)
    again = run("export", str(tmp_path / "orig"), str(tmp_path / "hf"))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_export_keeps_the_sources_dtype_without_dtype(tmp_path, caplog):
    """A float32 checkpoint exports float32 bit for bit; a bfloat16 ``convert`` folder exports bfloat16. The
    outputs' permissions are the umask's; orbax's OCDBT merge notice does not reach the progress bar."""
    import os
    import stat

    import torch
    from safetensors.torch import load_file

    from internvl_jax.cli import main
    from reference import tiny_internvl

    tiny_internvl("qwen2").save_pretrained(tmp_path / "src")
    main(["export", str(tmp_path / "src"), str(tmp_path / "f32")])
    src, f32 = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "f32" / "model.safetensors")
    assert sorted(src) == sorted(f32) and all(torch.equal(src[k], f32[k]) for k in src)
    main(["convert", str(tmp_path / "src"), str(tmp_path / "orbax"), "--dtype", "bfloat16"])
    assert "OCDBT" not in caplog.text
    main(["export", str(tmp_path / "orbax"), str(tmp_path / "bf16")])
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    mask = os.umask(0)
    os.umask(mask)
    for out in ("f32", "orbax", "bf16"):
        assert stat.S_IMODE(os.stat(tmp_path / out).st_mode) == 0o777 & ~mask, out


def test_the_demo_workdir_gets_the_umasks_permissions(monkeypatch, tmp_path):
    import os
    import stat

    from internvl_jax.cli import _new_folder

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    old = os.umask(0o027)
    try:
        assert stat.S_IMODE(os.stat(_new_folder("x-")).st_mode) == 0o750
    finally:
        os.umask(old)
