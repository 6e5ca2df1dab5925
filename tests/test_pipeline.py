"""The grain pipeline: seeded and deterministic, every epoch a permutation, exact resume from the iterator state
(in process, with worker processes, through orbax's CheckpointManager), disjoint per-process shards on two
localhost processes feeding sharding.shard_batch, weighted mixtures, skipped samples counted, array_record and
TFDS inputs, and the meta-format data path end to end.

The samples come from a fake ``prepare`` (its record's JSON says how many tokens and tiles, or to skip or raise)
whose tokens also draw from the per-element rng, so a resumed run shows the same rng draws too. Comparisons are
exact: batches are numpy arrays built by the same code on both sides.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from train.data import packing
from train.data.meta import Record
from train.data.packing import PackConfig
from train.data.pipeline import Source, array_record_source, make_pipeline, tfds_source
from train.loss import IGNORE

CTX, START, END = 255, 253, 254
CFG = PackConfig(max_tokens=24, max_tiles=4, tile_size=2, img_context_id=CTX, img_start_id=START, img_end_id=END,
                 tokens_per_tile=1)


def fake_prepare(record, rng):
    """A Sample of ``n`` text tokens and ``tiles`` one-tile images (or a skip / an exception) from the record's
    JSON; every token is drawn from ``rng``, and the first one names the record's line."""
    spec = json.loads(record.text)
    if "skip" in spec:
        return packing.Drop(record.dataset, record.line, spec["skip"])  # the Skipped shape
    if "raise" in spec:
        raise OSError(spec["raise"])
    ids = [record.line % 200] + rng.integers(1, 200, spec["n"] - 1).tolist()
    for _ in range(spec.get("tiles", 0)):
        ids += [START, CTX, END] + rng.integers(1, 200, 2).tolist()
    ids = np.asarray(ids, np.int32)
    labels = np.where(np.arange(len(ids)) >= len(ids) // 2, ids, IGNORE).astype(np.int32)
    pixels = rng.integers(0, 256, (spec.get("tiles", 0), 2, 2, 3), np.uint8)
    return {"input_ids": ids, "labels": labels, "positions": np.arange(len(ids), dtype=np.int32),
            "pixel_values": pixels, "dataset": record.dataset, "line": record.line}


def make_records(dataset, n, *, long_every=0, seed=0):
    """n records of 2-9 tokens and 0-2 tiles; every ``long_every``-th one has 3 images and 30 tokens (split)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        spec = {"n": int(rng.integers(2, 10)), "tiles": int(rng.integers(0, 3))}
        if long_every and i % long_every == 0:
            spec = {"n": 20, "tiles": 3}
        out.append(Record(dataset, i, json.dumps(spec)))
    return out


def pipeline(records, **kwargs):
    kwargs = {"batch_size": 2, "seed": 0, "process_index": 0, "process_count": 1, **kwargs}
    sources = records if isinstance(records[0], Source) else [Source("a", records)]
    return make_pipeline(sources, fake_prepare, kwargs.pop("pack", CFG), **kwargs)


def take(iterator, n):
    out = []
    for _ in range(n):
        out.append(next(iterator))
    return out


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (b1, s1), (b2, s2) in zip(got, want):
        assert sorted(b1) == sorted(b2)
        for k in b1:
            np.testing.assert_array_equal(b1[k], b2[k], err_msg=k)
        assert s1.batch == s2.batch and s1.totals == s2.totals


def members(batches):
    return [m for _, stats in batches for m in stats.batch.members]


# ----------------------------------------------------------------------------------------------
# Order
# ----------------------------------------------------------------------------------------------

def test_seeded_deterministic_and_different_per_seed():
    records = make_records("a", 40)
    first = take(iter(pipeline(records)), 6)
    assert_same_batches(take(iter(pipeline(records)), 6), first)
    other = take(iter(pipeline(records, seed=1)), 6)
    assert members(other) != members(first)
    batch, stats = first[0]
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (2, 24), "labels": (2, 24), "loss_weights": (2, 24), "positions": (2, 24),
        "segment_ids": (2, 24), "pixel_values": (2, 4, 2, 2, 3), "tile_mask": (2, 4)}
    assert stats.batch.fill_tokens == int((batch["segment_ids"] > 0).sum()) / 48
    assert stats.batch.fill_tiles == int(batch["tile_mask"].sum()) / 8


def test_each_epoch_is_a_new_permutation_and_a_finite_run_ends_with_a_padded_batch():
    records = make_records("a", 30)
    batches = list(iter(pipeline(records, num_epochs=3)))
    lines = [line for _, line in members(batches)]
    epochs = [lines[0:30], lines[30:60], lines[60:90]]
    assert len(lines) == 90
    for epoch in epochs:
        assert sorted(epoch) == list(range(1, 31))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])
    totals = batches[-1][1].totals
    assert totals.samples == 90 and totals.rows == 2 * len(batches) and totals.skipped == {}
    rows = np.concatenate([b["segment_ids"] for b, _ in batches])
    empty = np.flatnonzero((rows == 0).all(axis=1))
    assert empty.tolist() in ([], [len(rows) - 1])  # only a last, short batch has a padding row
    assert totals.token_capacity == len(rows) * 24 and totals.tokens == int((rows > 0).sum())


# ----------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------

def test_restoring_the_state_mid_epoch_gives_bitwise_the_same_batches():
    records = make_records("a", 40, long_every=5)  # split samples: some states point inside a sample's pieces
    it = iter(pipeline(records))
    states, batches = [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(it.get_state())))  # as grain's checkpoint handler stores it
        batches.append(next(it))
    assert any(s["event"] > 0 for s in states), "no state points into a split sample: the test lost its edge"
    for start in (1, 4, 7):
        resumed = iter(pipeline(records))
        resumed.set_state(states[start])
        assert_same_batches(take(resumed, 12 - start), batches[start:])
    # batches built ahead in a background thread: the same stream, and its state still points at the next batch
    ahead = iter(pipeline(records, prefetch_batches=2))
    assert_same_batches(take(ahead, 4), batches[:4])
    resumed = iter(pipeline(records))
    resumed.set_state(ahead.get_state())
    assert_same_batches(take(resumed, 8), batches[4:])


def test_worker_processes_give_the_same_stream_and_resume_exactly():
    records = make_records("a", 40, long_every=5)
    reference = take(iter(pipeline(records)), 8)
    it = iter(pipeline(records, workers=2))
    try:
        head = take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        tail = take(it, 5)
    finally:
        it.close()
    assert_same_batches(head + tail, reference)  # the stream does not depend on the worker count
    resumed = iter(pipeline(records, workers=2))
    try:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 5), tail)
    finally:
        resumed.close()


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    records = make_records("a", 40, long_every=5)
    it = iter(pipeline(records))
    take(it, 5)
    train_state = {"w": np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                             data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 4)
    assert os.path.exists(tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json")
    fresh = iter(pipeline(records))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(train_state), data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], train_state["w"])
    assert_same_batches(take(restored["data"], 4), expected)


def test_a_position_taken_before_the_next_batch_saves_and_restores_as_the_iterator_then(tmp_path):
    """The trainer takes step s + 1's batch while the device runs step s and saves checkpoint s afterwards, from an
    IteratorPosition taken before: it writes grain's file as the iterator would have, and restores that point."""
    import grain
    import orbax.checkpoint as ocp

    from train.checkpoint import IteratorPosition

    records = make_records("a", 40, long_every=5)
    it = iter(pipeline(records))
    take(it, 5)
    position = IteratorPosition(it)
    with ocp.CheckpointManager(tmp_path / "now") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    expected = take(it, 4)  # the iterator moves on before the position is saved
    with ocp.CheckpointManager(tmp_path / "later") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(position)))
    name = os.path.join("5", "data", "process_0-of-1.json")
    assert open(tmp_path / "later" / name).read() == open(tmp_path / "now" / name).read()
    with ocp.CheckpointManager(tmp_path / "later") as mngr:
        restored = mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(
            iter(pipeline(records)))))
    assert_same_batches(take(restored["data"], 4), expected)


# ----------------------------------------------------------------------------------------------
# Multi-host: two localhost processes
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _multihost_worker(process_id: int, port: str, out: str) -> None:
    """One process: its own shard of one epoch (process index/count from jax), then its first batch put into a
    4-device data-parallel mesh with sharding.shard_batch and gathered back."""
    import jax
    from jax.experimental import multihost_utils

    import sharding
    from sharding.distributed import initialize

    assert initialize(f"localhost:{port}", 2, process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4
    batches = list(iter(pipeline(make_records("a", 30), num_epochs=1, process_index=None, process_count=None)))
    local = batches[0][0]
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=1)
    global_batch = sharding.shard_batch(local, mesh, "dp")
    gathered = multihost_utils.process_allgather(global_batch["input_ids"], tiled=True)
    np.savez(f"{out}_{process_id}.npz", members=np.array([line for _, line in members(batches)]),
             local=local["input_ids"], global_shape=np.array(global_batch["input_ids"].shape),
             gathered=np.asarray(gathered))


def test_two_processes_read_disjoint_shards_that_cover_the_epoch(tmp_path):
    out, port = str(tmp_path / "out"), str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd(), env.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), port, out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    got = [np.load(f"{out}_{i}.npz") for i in range(2)]
    lines = [set(g["members"].tolist()) for g in got]
    assert len(got[0]["members"]) + len(got[1]["members"]) == 30
    assert not lines[0] & lines[1] and lines[0] | lines[1] == set(range(1, 31))
    # the same epoch, read by one process, is the two shards' elements interleaved
    single = [line for _, line in members(list(iter(pipeline(make_records("a", 30), num_epochs=1))))]
    assert single[0::2] == got[0]["members"].tolist() and single[1::2] == got[1]["members"].tolist()
    # shard_batch: the global batch is process 0's rows then process 1's
    assert got[0]["global_shape"].tolist() == [4, 24]
    np.testing.assert_array_equal(got[0]["gathered"], np.concatenate([got[0]["local"], got[1]["local"]]))


# ----------------------------------------------------------------------------------------------
# Mixtures, bad samples, other inputs
# ----------------------------------------------------------------------------------------------

def test_weighted_mixture_draws_by_weight_and_repeats_each_dataset():
    sources = [Source("big", make_records("big", 50), weight=3.0), Source("small", make_records("small", 7), 1.0)]
    got = members(take(iter(pipeline(sources, batch_size=4)), 40))
    share = sum(ds == "big" for ds, _ in got) / len(got)
    assert len(got) > 200 and abs(share - 0.75) < 0.02
    assert {line for ds, line in got if ds == "small"} == set(range(1, 8))  # the small set repeats
    with pytest.raises(ValueError, match="infinite stream"):
        pipeline(sources, num_epochs=1)
    with pytest.raises(ValueError, match="every source has a weight"):
        pipeline([sources[0], Source("plain", make_records("plain", 3))])


def test_skipped_and_failing_samples_are_counted_and_the_others_unchanged():
    good = make_records("a", 20)
    bad = [Record("a", 21, json.dumps({"skip": "image file not found"})), Record("a", 22, "{\"raise\": \"disk\"}"),
           Record("a", 23, json.dumps({"n": 30, "tiles": 0}))]  # text-only over the budget: dropped by the split rule
    batches = list(iter(pipeline(good + bad, num_epochs=1, batch_size=1)))
    totals = batches[-1][1].totals
    assert totals.skipped == {"image file not found": 1, f"{packing.PREPARE_RAISED} OSError": 1,
                              packing.PIECE_NO_IMAGE: 1, packing.TEXT_AFTER_CUT: 1}
    assert sorted(line for _, line in members(batches)) == list(range(1, 21))
    # every good sample is whole in its row: its first token names its line, its length is its record's
    for batch, stats in batches:
        for (ds, line), seg in zip(stats.batch.members, range(1, 99)):
            ids = batch["input_ids"][0][batch["segment_ids"][0] == seg]
            assert ids[0] == line % 200 and len(ids) == _length(good[line - 1])
    metrics = batches[-1][1].metrics()
    assert metrics["total_skipped"] == 4 and metrics["total_skipped/image file not found"] == 1


def _length(record):
    spec = json.loads(record.text)
    return spec["n"] + 5 * spec["tiles"]


def test_array_record_and_tfds_sources_feed_the_same_pipeline(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    records = make_records("ar", 12)
    path = str(tmp_path / "lines.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for r in records:
        writer.write(r.text.encode())
    writer.close()
    from_file = list(iter(pipeline([array_record_source("ar", path)], num_epochs=1)))
    assert_same_batches(from_file, list(iter(pipeline([Source("ar", records)], num_epochs=1))))

    import tensorflow_datasets as tfds  # reads and writes array_record without TensorFlow

    class Lines(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "line": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for r in records:
                yield r.line, {"text": r.text, "line": r.line}

    Lines(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    source = tfds_source("ar", "lines", "train", data_dir=str(tmp_path / "tfds"))
    from_tfds = list(iter(pipeline([source], num_epochs=1)))
    assert sorted(members(from_tfds)) == [("ar", i) for i in range(1, 13)]
    # each record, found by its line, gives the same sub-sample whatever the source's storage order
    assert sum(int(b["tile_mask"].sum()) for b, _ in from_tfds) == sum(json.loads(r.text)["tiles"] for r in records)


def test_meta_datasets_through_prepare_pack_into_valid_rows(tmp_path):
    from PIL import Image
    from test_tokenizer import write_bpe_folder

    from internvl_jax.model import check_image_tokens
    from internvl_jax.presets import get_preset
    from internvl_jax.processing import Tokenizer, get_template
    from train.data.meta import read_meta
    from train.data.pipeline import MetaPrepare, meta_sources
    from train.data.sample import SampleSettings

    config = get_preset("tiny-qwen2")
    (tmp_path / "tok").mkdir()
    write_bpe_folder(tmp_path / "tok")
    tok = Tokenizer.from_pretrained(str(tmp_path / "tok"))
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(56, 28), (28, 28), (40, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    (tmp_path / "img.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "conversations": turns(
        "what is in this photo", "a cat")}) + "\n" for i in range(3)) + json.dumps({"image": "missing.png",
        "conversations": turns("and here", "nothing")}) + "\n")
    (tmp_path / "text.jsonl").write_text(json.dumps({"conversations": turns("hello world", "hello")}) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({
        "img": {"annotation": "img.jsonl", "max_dynamic_patch": 2}, "text": {"annotation": "text.jsonl"}}))
    specs = read_meta(tmp_path / "meta.json")
    settings = SampleSettings.from_config(config, tok, get_template("internvl2_5"), data_augment=False)
    cfg = PackConfig.for_model(config, tok, max_tokens=512, max_tiles=8)
    ds = make_pipeline(meta_sources(specs), MetaPrepare(specs, settings), cfg, batch_size=2, num_epochs=1,
                       process_index=0, process_count=1)
    batches = list(iter(ds))
    assert sorted(members(batches)) == [("img", 1), ("img", 2), ("img", 3), ("text", 1)]
    assert batches[-1][1].totals.skipped_total == 1  # the missing image
    for batch, _ in batches:
        check_image_tokens(batch["input_ids"], batch["tile_mask"], tok.img_context_id, config.tokens_per_tile)
        assert (batch["labels"][batch["segment_ids"] == 0] == IGNORE).all()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _multihost_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
