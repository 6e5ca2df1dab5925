"""Packing: labels shifted per sample, loss weights per sub-sample, rows within both budgets with image spans whole,
positions as the samples give them, segment ids, the original's split rule for over-long samples, skipped items
counted, the fill rate; and a packed row gives the per-sample losses and gradients of the samples run alone.

References: hand-written expectations for the small cases; for the split rule a line-by-line transcription of
the original's ``PackedDataset.split_buffer`` (OpenGVLab/InternVL internvl_chat/internvl/train/dataset_packed.py)
over index ranges; for the model test, the tiny model run on each sample alone.
"""

import bisect
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.model import InternVL, check_image_tokens, init_params
from internvl_jax.presets import get_preset
from train.data import packing
from train.data.packing import PackConfig, PackStats, image_spans, loss_weights, pack, shift_labels, split_ranges
from train.loss import IGNORE, token_cross_entropy

TOL = 1e-5  # float32: packed row vs samples alone, per-token CE and gradients (max abs diff)

CTX, START, END = 255, 253, 254  # IMG_CONTEXT (the tiny presets' image token), <img>, </img>
TPT = 2  # IMG_CONTEXT tokens per tile in the pure packing tests
CFG = PackConfig(max_tokens=32, max_tiles=6, tile_size=2, img_context_id=CTX, img_start_id=START, img_end_id=END,
                 tokens_per_tile=TPT, loss_mode="square")


def make_sample(parts, line, *, dataset="d", tpt=TPT, size=2, answer=None, seed=None):
    """parts: ints (text runs) and ("img", tiles) image spans, in order. Labels: the tokens of the last ``answer``
    text positions (default: the whole last text run) are supervised, the rest IGNORE. Positions 0..n-1."""
    rng = np.random.default_rng(line if seed is None else seed)
    ids, tiles = [], 0
    for p in parts:
        if isinstance(p, tuple):
            ids += [START] + [CTX] * (tpt * p[1]) + [END]
            tiles += p[1]
        else:
            ids += rng.integers(1, 200, p).tolist()
    ids = np.asarray(ids, np.int32)
    last = parts[-1] if isinstance(parts[-1], int) else 0
    k = last if answer is None else answer
    labels = np.full(len(ids), IGNORE, np.int32)
    if k:
        labels[-k:] = ids[-k:]
    return {"input_ids": ids, "labels": labels, "positions": np.arange(len(ids), dtype=np.int32),
            "pixel_values": rng.integers(0, 256, (tiles, size, size, 3), np.uint8),
            "dataset": dataset, "line": line}


def random_stream(n, seed=0):
    """n samples of 0-3 images (1-3 tiles each) between text runs; some longer than L = 32."""
    rng = np.random.default_rng(seed)
    out = []
    for line in range(1, n + 1):
        parts = [int(rng.integers(1, 8))]
        for _ in range(int(rng.integers(0, 4))):
            parts += [("img", int(rng.integers(1, 4))), int(rng.integers(1, 8))]
        out.append(make_sample(parts, line))
    return out


def segments(row):
    """{segment id: slice} of a row."""
    seg = row["segment_ids"]
    return {int(s): slice(int(np.flatnonzero(seg == s)[0]), int(np.flatnonzero(seg == s)[-1]) + 1)
            for s in np.unique(seg[seg > 0])}


# ----------------------------------------------------------------------------------------------
# Labels and weights
# ----------------------------------------------------------------------------------------------

def test_shift_labels_aligns_each_position_with_its_next_token():
    assert shift_labels([IGNORE, IGNORE, 7, 8, 9]).tolist() == [IGNORE, 7, 8, 9, IGNORE]
    assert shift_labels([5]).tolist() == [IGNORE]


@pytest.mark.parametrize("mode, expected", [("token", 1.0), ("sample", 1 / 4), ("square", 1 / 2)])
def test_loss_weights_follow_the_mode_per_sub_sample(mode, expected):
    labels = np.array([IGNORE, 1, 2, 3, 4, IGNORE])  # x = 4 supervised positions
    assert loss_weights(labels, mode).tolist() == [0, expected, expected, expected, expected, 0]
    assert loss_weights(np.full(3, IGNORE), mode).tolist() == [0, 0, 0]  # len2weight(0) = 0
    # a row: segment 1 has 4 supervised positions, segment 2 has 1, padding has none
    row = np.array([1, 2, 3, 4, IGNORE, 5, IGNORE, IGNORE])
    seg = np.array([1, 1, 1, 1, 1, 2, 2, 0])
    per_seg = {"token": (1, 1), "sample": (1 / 4, 1), "square": (1 / 2, 1)}[mode]
    want = [per_seg[0]] * 4 + [0, per_seg[1], 0, 0]
    np.testing.assert_allclose(loss_weights(row, mode, seg), want, rtol=1e-7)
    with pytest.raises(ValueError, match="not one of token, sample, square"):
        loss_weights(row, "mean")


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------

def test_rows_obey_budgets_and_keep_every_sample_whole_and_in_order():
    stream = [s for s in random_stream(120) if len(s["input_ids"]) <= 32 and len(s["pixel_values"]) <= 6]
    by_line = {s["line"]: s for s in stream}
    totals = PackStats()
    rows = list(pack(stream, CFG, totals))
    seen = []
    for row, stats in rows:
        assert {k: v.shape for k, v in row.items()} == {
            "input_ids": (32,), "labels": (32,), "loss_weights": (32,), "positions": (32,), "segment_ids": (32,),
            "pixel_values": (6, 2, 2, 3), "tile_mask": (6,)}
        assert row["positions"].dtype == np.int32 and row["segment_ids"].dtype == np.int32
        segs = segments(row)
        assert sorted(segs) == list(range(1, len(segs) + 1))  # 1..k, contiguous, padding 0 at the end
        assert (row["segment_ids"][sum(s.stop - s.start for s in segs.values()):] == 0).all()
        tile = 0
        for seg_id, (ds, line) in zip(sorted(segs), stats.members):
            sl, s = segs[seg_id], by_line[line]
            k = len(s["pixel_values"])
            np.testing.assert_array_equal(row["input_ids"][sl], s["input_ids"])
            np.testing.assert_array_equal(row["labels"][sl], shift_labels(s["labels"]))
            np.testing.assert_array_equal(row["positions"][sl], s["positions"])  # restart per sample
            np.testing.assert_array_equal(row["loss_weights"][sl], loss_weights(shift_labels(s["labels"]), "square"))
            np.testing.assert_array_equal(row["pixel_values"][tile:tile + k], s["pixel_values"])
            tile += k
            seen.append(line)
        assert row["tile_mask"].tolist() == [True] * tile + [False] * (6 - tile)
        assert (row["pixel_values"][tile:] == 0).all() and (row["labels"][row["segment_ids"] == 0] == IGNORE).all()
        check_image_tokens(row["input_ids"][None], row["tile_mask"][None], CTX, TPT)  # spans filled by own tiles
    assert seen == [s["line"] for s in stream]  # stream order, nothing lost
    # greedy next-fit: the first sample of each row did not fit in the row before
    for (prev, _), (_, stats) in zip(rows, rows[1:]):
        first = by_line[stats.members[0][1]]
        used = int((prev["segment_ids"] > 0).sum()), int(prev["tile_mask"].sum())
        assert used[0] + len(first["input_ids"]) > 32 or used[1] + len(first["pixel_values"]) > 6
    tokens = sum(len(s["input_ids"]) for s in stream)
    tiles = sum(len(s["pixel_values"]) for s in stream)
    assert totals.fill_tokens == tokens / (len(rows) * 32) and totals.fill_tiles == tiles / (len(rows) * 6)
    assert totals.samples == totals.segments == len(stream) and totals.skipped == {}


def test_no_packing_puts_one_sample_per_row():
    stream = random_stream(10)[:6]
    cfg = PackConfig(**{**CFG.__dict__, "packing": False, "max_tokens": 64, "max_tiles": 12})
    rows = list(pack(stream, cfg))
    assert [stats.members for _, stats in rows] == [[("d", s["line"])] for s in stream]
    for (row, _), s in zip(rows, stream):
        n = len(s["input_ids"])
        assert row["segment_ids"].tolist() == [1] * n + [0] * (64 - n)
        np.testing.assert_array_equal(row["input_ids"][:n], s["input_ids"])


def test_v2pe_positions_are_carried_as_float32():
    s = make_sample([3, ("img", 1), 2], 1)
    s["positions"] = np.array([0, 1, 2, 3, 3.25, 3.5, 4, 5, 6], np.float32)
    with pytest.raises(TypeError, match="v2pe"):
        list(pack([s], CFG))
    (row, _), = pack([s], PackConfig(**{**CFG.__dict__, "v2pe": True}))
    assert row["positions"].dtype == np.float32 and row["positions"][:9].tolist() == s["positions"].tolist()


# ----------------------------------------------------------------------------------------------
# Over-long samples: the original's split rule
# ----------------------------------------------------------------------------------------------

def original_split_buffer(ids, labels, max_tokens):
    """The original's ``split_buffer`` on one sample, transcribed over [start, end) ranges of the sample
    (pixel_values rows stand for tiles; ``check_valid``: supervised share > 1/256)."""
    n = len(ids)
    if n <= max_tokens:
        return [(0, n)]
    tiles = lambda a, b: int((ids[a:b] == CTX).sum()) // TPT  # noqa: E731
    valid = lambda a, b: (1 - (labels[a:b] == IGNORE).sum() / (b - a)) > 1 / 256  # noqa: E731
    out, a = [], 0
    while n - a > max_tokens:
        window = ids[a:]
        starts = [i for i, t in enumerate(window) if t == START]
        if window[max_tokens] in (START, CTX, END):  # _image_is_splitted
            cut = bisect.bisect_left(starts, max_tokens)
            left = starts[cut] if window[max_tokens] == START else starts[cut - 1]
            right = left
        else:
            cut = bisect.bisect(starts, max_tokens)
            right = starts[cut] if cut < len(starts) else None
            left = max_tokens
        if tiles(a, a + left) >= 1 and valid(a, a + left):
            out.append((a, a + left))
        if right is None or tiles(a + right, n) == 0:
            break
        a += right
        if n - a <= max_tokens and valid(a, n):
            out.append((a, n))
            break
    return out


def piece_ranges(sample, cfg=CFG):
    """(start, end) of each kept piece, read from the positions (0..n-1) of the sample's segments."""
    out = []
    for row, stats in pack([sample], cfg):
        for sl in segments(row).values():
            out.append((int(row["positions"][sl.start]), int(row["positions"][sl.stop - 1]) + 1))
    return out


def test_split_rule_matches_the_original_on_random_over_long_samples():
    rng = np.random.default_rng(1)
    checked = 0
    for line in range(1, 400):
        parts = [int(rng.integers(0, 12))]
        for _ in range(int(rng.integers(0, 5))):
            parts += [("img", int(rng.integers(1, 4))), int(rng.integers(0, 12))]
        s = make_sample([p for p in parts if p != 0] or [1], line, answer=int(rng.integers(0, 10)))
        kinds = [kind for kind, _, _ in split_ranges(len(s["input_ids"]), image_spans(s["input_ids"], CFG), 32)]
        if len(s["input_ids"]) > 32 and "image" not in kinds:  # where the original would loop forever
            expected = original_split_buffer(s["input_ids"], s["labels"], 32)
            expected = [(a, b) for a, b in expected if int((s["input_ids"][a:b] == CTX).sum()) // TPT <= 6]
            assert piece_ranges(s) == expected, (parts, s["input_ids"].tolist())
            checked += 1
    assert checked > 100


def test_cut_in_text_drops_the_text_up_to_the_next_image():
    # 30 text, image (1 tile: <img> C C </img> at 30..33), 10 text: the cut at 32 falls in the image
    # -> cut before <img> at 30; right piece [30, 44) keeps positions 30..43
    s = make_sample([30, ("img", 1), 10], 1)
    s["labels"][:] = s["input_ids"]  # all supervised: no piece fails check_valid
    assert piece_ranges(s) == [(30, 44)]  # the left piece has no image: dropped, as the original
    # text, a 1-tile image at 10..13, 23 text (14..36), a 2-tile image at 37..42, 5 text: the cut at 32 is in
    # text; left [0, 32) keeps its image, the text [32, 37) is dropped, the right piece starts at <img> (37)
    s = make_sample([10, ("img", 1), 23, ("img", 2), 5], 2)
    s["labels"][:] = s["input_ids"]
    assert split_ranges(len(s["input_ids"]), image_spans(s["input_ids"], CFG), 32) == [
        ("piece", 0, 32), ("text", 32, 37), ("piece", 37, 48)]
    (row1, st1), (row2, st2) = pack([s], CFG)
    assert row1["positions"][:32].tolist() == list(range(32))
    assert row2["positions"][:11].tolist() == list(range(37, 48))  # the right piece keeps its positions
    assert row2["labels"][10] == IGNORE  # the sample's last token
    assert row1["labels"][31] == s["input_ids"][32]  # shifted before cutting: the next token of the sample
    assert st1.split_pieces == st2.split_pieces == 1 and st1.samples == 1 and st2.samples == 0
    assert st1.skipped == {packing.TEXT_AFTER_CUT: 1} and st1.dropped_tokens == 5


def test_cut_exactly_at_an_image_start_keeps_the_whole_left_part():
    s = make_sample([6, ("img", 1), 22, ("img", 1), 4], 1)  # second <img> at index 32 = L
    s["labels"][:] = s["input_ids"]
    assert piece_ranges(s) == [(0, 32), (32, 40)]


def test_text_only_over_long_sample_is_dropped_entirely_as_the_original():
    s = make_sample([40], 7, dataset="chat")
    totals = PackStats()
    assert list(pack([s], CFG, totals)) == []
    assert totals.skipped == {packing.PIECE_NO_IMAGE: 1, packing.TEXT_AFTER_CUT: 1}
    assert totals.dropped_tokens == 40


def test_pieces_with_too_few_labels_too_many_tiles_or_an_oversized_image_are_dropped():
    few = make_sample([28, ("img", 1), 20], 1, answer=0)  # nothing supervised: every piece fails check_valid
    tiles = make_sample([2, ("img", 7), 2], 2)  # fits L = 32 but 7 tiles > T = 6
    huge = make_sample([4, ("img", 16), 2], 3)  # one image span of 34 tokens: longer than the budget
    totals = PackStats()
    assert list(pack([few, tiles, huge], CFG, totals)) == []
    assert totals.skipped == {packing.PIECE_FEW_LABELS: 1, packing.TEXT_AFTER_CUT: 1, packing.TOO_MANY_TILES: 1,
                              packing.PIECE_NO_IMAGE: 1, packing.IMAGE_TOO_LONG: 1}


def test_without_splitting_an_over_long_sample_is_skipped():
    cfg = PackConfig(**{**CFG.__dict__, "split": False})
    totals = PackStats()
    rows = list(pack([make_sample([40], 1), make_sample([5], 2)], cfg, totals))
    assert [st.members for _, st in rows] == [[("d", 2)]] and totals.skipped == {packing.TOO_LONG: 1}


def test_skipped_items_are_counted_and_logged_once_each(caplog):
    class Skipped:  # train/data/sample.py's shape: dataset, line, reason
        def __init__(self, dataset, line, reason):
            self.dataset, self.line, self.reason = dataset, line, reason

    bad_shape = make_sample([4], 3)
    bad_shape["pixel_values"] = np.zeros((1, 5, 5, 3), np.uint8)
    stream = [make_sample([4], 1), Skipped("imgs", 2, "image file not found"), bad_shape,
              Skipped("imgs", 2, "image file not found"), make_sample([3], 4)]
    totals = PackStats()
    with caplog.at_level(logging.WARNING, logger="train.data.packing"):
        rows = list(pack(stream, CFG, totals))
    assert [m for _, st in rows for m in st.members] == [("d", 1), ("d", 4)]
    assert totals.skipped == {"image file not found": 2, packing.MALFORMED: 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once per (dataset, line, reason)
    assert "imgs line 2: image file not found" in messages[0] and "d line 3: malformed sample" in messages[1]


def test_float_pixels_are_a_type_error_naming_the_sample():
    """Rows carry uint8 levels (the model normalises them): normalised float tiles are a caller's bug, not bad data."""
    sample = make_sample([4, ("img", 1), 3], 7)
    sample["pixel_values"] = sample["pixel_values"].astype(np.float32)
    with pytest.raises(TypeError, match="sample d:7 has float32 pixel_values; rows carry uint8 levels"):
        list(pack([sample], CFG))


def test_fill_rate_counts_capacity_of_every_row():
    # 20 tokens; then 20 + <img> + 2 tiles x 2 IMG_CONTEXT + </img> + 1 = 27, which does not fit beside them
    rows = list(pack([make_sample([20], 1), make_sample([20, ("img", 2), 1], 2)], CFG))
    assert [(st.tokens, st.tiles) for _, st in rows] == [(20, 0), (27, 2)]
    total = PackStats()
    for _, st in rows:
        total.add(st)
    assert total.fill_tokens == 47 / 64 and total.fill_tiles == 2 / 12


# ----------------------------------------------------------------------------------------------
# A packed row = the samples alone (losses and gradients), on the tiny model
# ----------------------------------------------------------------------------------------------

MODEL = get_preset("tiny-qwen2")  # 28 px tiles, 1 IMG_CONTEXT token per tile, image token 255


def test_packed_row_gives_the_per_sample_losses_and_gradients_of_the_samples_alone():
    L, T, size = 40, 4, MODEL.image_size
    # three samples (2 tiles, text only, 1 tile), supervised answers of different lengths
    samples = [make_sample([3, ("img", 2), 5], 1, tpt=1, size=size, answer=4),
               make_sample([12], 2, tpt=1, size=size, answer=7),
               make_sample([2, ("img", 1), 9], 3, tpt=1, size=size, answer=2)]
    cfg = PackConfig.for_model(MODEL, max_tokens=L, max_tiles=T, img_start_id=START, img_end_id=END,
                               loss_mode="square")
    (row, stats), = pack(samples, cfg)
    assert stats.segments == 3 and stats.tokens == 38
    model = InternVL(MODEL)
    params = jax.jit(lambda key: init_params(MODEL, key))(jax.random.PRNGKey(0))

    def loss(p, r, keep):  # sum(w * CE) / sum(w) over the positions kept, and the per-position CE [L]
        logits = model.apply({"params": p}, r["input_ids"][None], r["pixel_values"][None], r["tile_mask"][None],
                             positions=r["positions"][None], segment_ids=r["segment_ids"][None])
        ce = token_cross_entropy(logits, r["labels"][None])[0]
        w = r["loss_weights"] * keep
        return jnp.sum(w * ce) / jnp.sum(w), ce

    def alone(s):
        """The sample by itself: plain causal attention over one sequence, positions 0..n-1, its own tiles.
        (Padded at the end to the row's shapes so one compiled program serves both; causal attention makes
        later positions invisible to the sample.) Its own weights: square, x = its supervised positions."""
        n, k = len(s["input_ids"]), len(s["pixel_values"])
        labels = np.full(L, IGNORE, np.int32)
        labels[:n] = shift_labels(s["labels"])
        pixels = np.zeros((T, size, size, 3), np.uint8)
        pixels[:k] = s["pixel_values"]
        x = (labels != IGNORE).sum()
        return {"input_ids": np.pad(s["input_ids"], (0, L - n)), "labels": labels,
                "loss_weights": np.where(labels != IGNORE, 1 / np.sqrt(x), 0).astype(np.float32),
                "positions": np.arange(L, dtype=np.int32), "segment_ids": np.ones(L, np.int32),
                "pixel_values": pixels, "tile_mask": np.arange(T) < k}

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (total, ce), _ = grad(params, row, np.ones(L, np.float32))
    for i, s in enumerate(samples, start=1):
        in_row, n = row["segment_ids"] == i, len(s["input_ids"])
        (got_loss, _), got = grad(params, row, in_row.astype(np.float32))
        (want_loss, want_ce), want = grad(params, alone(s), (np.arange(L) < n).astype(np.float32))
        np.testing.assert_allclose(ce[in_row], want_ce[:n], atol=TOL, rtol=0)
        np.testing.assert_allclose(got_loss, want_loss, atol=TOL, rtol=0)
        for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g, h, atol=TOL, rtol=0, err_msg=f"sample {i} {jax.tree_util.keystr(path)}")
    # the whole row's loss is the samples' weighted CE over the row's total weight
    w = row["loss_weights"]
    np.testing.assert_allclose(total, float(np.sum(w * np.asarray(ce)) / np.sum(w)), atol=TOL, rtol=0)
