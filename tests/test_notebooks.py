"""Every notebook of notebooks/ runs top to bottom on a kernel of this Python (nbclient), with the suite's
environment (JAX on the CPU, 8 simulated devices: conftest.py sets XLA_FLAGS before any kernel starts), and the
figures it computes are held to the thresholds of the library's own tests. A notebook writes its figures to
``$INTERNVL_NOTEBOOK_RESULTS/<name>.json``; stored notebooks carry no outputs."""

import json
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def run_notebook(name: str, tmp_path, monkeypatch) -> dict:
    """Execute notebooks/<name>.ipynb in its folder; returns the figures it wrote."""
    monkeypatch.setenv("INTERNVL_NOTEBOOK_RESULTS", str(tmp_path))
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    print(f"{name}: {time.perf_counter() - t0:.1f} s wall")
    with open(tmp_path / f"{name}.json") as f:
        return json.load(f)


def test_stored_notebooks_have_no_outputs():
    names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
    assert names, "no notebooks"
    for name in names:
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"


def test_quickstart(tmp_path, monkeypatch):
    r = run_notebook("quickstart", tmp_path, monkeypatch)
    assert r["tiles"] == r["planned_tiles"] == r["grid"][0] * r["grid"][1] + 1
    assert r["streamed_answer"] == r["answer"] and r["streamed_pieces"].strip() == r["answer"]
    assert len(r["batch_answers"]) == 3 and all(isinstance(a, str) for a in r["batch_answers"])


def test_parity(tmp_path, monkeypatch):
    from reference import TOL_LOGITS, TOL_MODULE

    r = run_notebook("parity", tmp_path, monkeypatch)
    f32, bf16, torch_bf16 = r["float32"], r["bfloat16"], r["torch_bfloat16"]
    layers = [n for n in r["names"] if n.startswith("decoder layer")]
    assert len(layers) >= 2 and r["names"][:2] == ["vision tower", "projector"] and r["names"][-1] == "logits"
    for name in ["vision tower", "projector", *layers]:
        assert f32[name] <= TOL_MODULE, (name, f32[name])
    assert f32["logits"] <= TOL_LOGITS, f32["logits"]
    assert 0 < torch_bf16["logits"] and bf16["logits"] <= 2 * torch_bf16["logits"], (bf16["logits"], torch_bf16["logits"])


def test_fine_tuning(tmp_path, monkeypatch):
    from reference import TOL_LOGITS

    r = run_notebook("fine_tuning", tmp_path, monkeypatch)
    stop, steps, losses = r["stopped_at"], r["steps"], r["losses"]
    # metrics.jsonl: the interrupted run's steps 1..stop, then the resumed run's stop+1..end (its checkpoint was at stop)
    assert r["resumed_from"] == stop and steps == list(range(1, len(steps) + 1)) and len(steps) > stop
    assert losses[-1] < losses[0], losses
    assert r["accuracy_after"] > r["accuracy_before"], (r["accuracy_before"], r["accuracy_after"])
    assert r["export_logits_error"] <= TOL_LOGITS, r["export_logits_error"]


def test_sharding_and_planning(tmp_path, monkeypatch):
    r = run_notebook("sharding_and_planning", tmp_path, monkeypatch)
    assert set(r["placed_bytes"]) == {"dp", "fsdp", "fsdp_tp"}
    assert r["placed_bytes"] == r["estimated_bytes"]  # the estimate is exact for params (as tests/test_plan.py)
    assert r["placed_bytes"]["fsdp"] < r["placed_bytes"]["dp"]
    for p in r["plans"]:
        verdict = "verdict: fits" if p["per_device_bytes"] <= p["memory"] else "verdict: does not fit"
        assert p["last_lines"] == [f"per-device bytes: {p['per_device_bytes']}", verdict], p
        if p["smallest_bytes"] is not None:
            assert p["smallest_bytes"] <= p["smallest_memory"], p
    assert any(p["last_lines"][-1] == "verdict: does not fit" for p in r["plans"])
    c = r["compiled"]
    assert c["per_device_bytes"] == c["compiled_total"] > 0
    assert c["last_lines"] == [f"per-device bytes: {c['compiled_total']}", "verdict: fits"]
    temp = r["attention_temp_bytes"]
    for length in (1024, 4096, 16384):
        scores = 8 * length * length * 4  # the [heads, L, L] float32 scores the batched form materialises
        assert temp[f"batched/{length}"] >= scores > temp[f"blockwise/{length}"], (length, temp)
