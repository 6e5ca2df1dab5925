"""Training against PyTorch: our train step and optimiser on packed rows, and
``transformers.InternVLForConditionalGeneration`` + ``torch.optim.AdamW`` on the same samples run one at a time.

Reference: the tiny perturbed transformers InternVL of ``reference.py`` (qwen2 text, InternViT-300M style vision,
56 px tiles of 4 IMG_CONTEXT tokens, id 255), float32. Each sample runs alone (batch of 1, no padding) with the
standard HF shift (``logits[:-1]`` predict ``labels[1:]``); its tokens are weighted ``1 / sqrt(x)``, x = its
supervised targets, and the loss is ``sum(w * CE) / sum(w)`` over all samples ("square" weighting over the
global batch); then backward, ``clip_grad_norm_``, AdamW in two param groups (no decay for biases, norms, the
ViT position table and class token, LayerScale) and a ``get_cosine_schedule_with_warmup`` step.

Ours: the same samples packed by hand into 2 rows (labels shifted per sample, positions restarting, segment ids,
tiles concatenated in sample order), ``train.step.make_train_step`` with ``train.optim.build_optimizer`` built as
``train/trainer.py`` builds them. The gradients are read from inside the step (a probe chained before the
optimiser keeps them as its state); torch's gradients and parameters are brought into our layout by
``convert.load.from_state_dict``, the same key maps that load checkpoints.

Tolerances (float32): loss, relative; gradients, per tensor ``max |ours - torch| / max |torch|``; parameters
after 3 steps, max abs difference.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from convert.load import from_state_dict
from internvl_jax.processing import normalize
from reference import IMAGE_SIZE, IMAGE_TOKEN_ID, TOKENS_PER_TILE, max_diff, tiny_internvl
from train import optim
from train.loss import IGNORE
from train.state import TrainState
from train.step import make_train_step

TOL_LOSS = 1e-5  # relative
TOL_GRAD = 1e-4  # per tensor, max abs difference / max abs of torch's gradient
TOL_PARAMS = 1e-5  # max abs difference after STEPS updates
TOL_LR = 1e-6  # relative: our float32 schedule against HF's float64 one

IMG_START, IMG_END = 253, 254  # stand-ins for <img> / </img>: ordinary tokens of the tiny vocabulary
L, T = 56, 4  # row budget: tokens, tiles
VOCAB_CHUNK = 16  # the chunked loss, with L not a multiple of it
STEPS = 3
# warm-up of 1 step: update 0 has lr 0 (HF's scheduler), update 1 the peak, update 2 a point on the cosine;
# the clipping threshold lies below the gradient norms of this model, so every step clips (asserted below)
OPTIM = optim.OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1, max_grad_norm=0.5)
TOTAL_STEPS = 4

# A sample: (kind, length) parts. "text" unsupervised prompt tokens, "answer" supervised tokens, "image" one
# image of `length` tiles as <img> IMG_CONTEXT x (4 x tiles) </img>. A+B fill row 0 (49 of 56 tokens, 2 of 4
# tiles); C does not fit after them (78 > 56) and starts row 1 with D (48 tokens, 3 tiles). B is text-only.
SAMPLES = [
    [("text", 5), ("image", 2), ("text", 6), ("answer", 7)],
    [("text", 9), ("answer", 5), ("text", 3), ("answer", 4)],
    [("text", 3), ("image", 1), ("text", 4), ("image", 1), ("text", 2), ("answer", 8)],
    [("text", 4), ("image", 1), ("text", 3), ("answer", 6)],
]
ROWS = [[0, 1], [2, 3]]


def _sample(parts, rng) -> dict:
    """One conversation as train/data/sample.py gives it: input_ids, labels (NOT shifted), positions int32 [n],
    pixel_values uint8 [k, S, S, 3] (levels: our step normalises them, the torch side gets the host's
    normalisation, the original's)."""
    ids, labels, tiles = [], [], []
    for kind, n in parts:
        if kind == "image":
            span = [IMG_START] + [IMAGE_TOKEN_ID] * (n * TOKENS_PER_TILE) + [IMG_END]
            ids += span
            labels += [IGNORE] * len(span)
            tiles += [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) for _ in range(n)]
        else:
            text = rng.integers(0, IMG_START, n).tolist()
            ids += text
            labels += text if kind == "answer" else [IGNORE] * n
    pixels = np.stack(tiles) if tiles else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32),
            "positions": np.arange(len(ids), dtype=np.int32), "pixel_values": pixels, "dataset": "parity",
            "line": 0}


def _samples(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = [_sample(parts, rng) for parts in SAMPLES]
    for i, s in enumerate(out, start=1):
        s["line"] = i
    return out


def _pack(samples: list[dict]) -> dict:
    """The samples in ROWS as a packed batch (the contract's row format), written out by hand."""
    keys = {"input_ids": (np.int32, 0), "labels": (np.int32, IGNORE), "loss_weights": (np.float32, 0),
            "positions": (np.int32, 0), "segment_ids": (np.int32, 0)}
    batch = {k: np.full((len(ROWS), L), fill, dtype) for k, (dtype, fill) in keys.items()}
    batch["pixel_values"] = np.zeros((len(ROWS), T, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    batch["tile_mask"] = np.zeros((len(ROWS), T), bool)
    for r, members in enumerate(ROWS):
        at, tile = 0, 0
        for seg, i in enumerate(members, start=1):
            s = samples[i]
            n, k = len(s["input_ids"]), len(s["pixel_values"])
            shifted = np.append(s["labels"][1:], IGNORE)  # position j predicts token j + 1 of the same sample
            x = np.sum(shifted != IGNORE)
            row = slice(at, at + n)
            batch["input_ids"][r, row] = s["input_ids"]
            batch["labels"][r, row] = shifted
            batch["loss_weights"][r, row] = np.where(shifted != IGNORE, 1 / np.sqrt(x), 0)
            batch["positions"][r, row] = np.arange(n)
            batch["segment_ids"][r, row] = seg
            batch["pixel_values"][r, tile:tile + k] = s["pixel_values"]
            batch["tile_mask"][r, tile:tile + k] = True
            at, tile = at + n, tile + k
    return batch


# --------------------------------------------------------------------------------------------------------------
# The torch side
# --------------------------------------------------------------------------------------------------------------


def _torch_decays(name: str) -> bool:
    """Issue 14's grouping written on transformers' names: no weight decay for biases, norms, the ViT position
    table (and its class token), LayerScale."""
    no_decay = (name.endswith(".bias") or any("norm" in part for part in name.split(".")[:-1])
                or name.endswith(("embeddings.position_embeddings", "embeddings.cls_token", ".lambda_1", ".lambda_2")))
    return not no_decay


def _torch_optimizer(ref):
    decay = [p for n, p in ref.named_parameters() if _torch_decays(n)]
    rest = [p for n, p in ref.named_parameters() if not _torch_decays(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)
    from transformers import get_cosine_schedule_with_warmup

    return opt, get_cosine_schedule_with_warmup(opt, OPTIM.warmup_steps, TOTAL_STEPS)


def _torch_loss(ref, samples: list[dict]) -> torch.Tensor:
    """sum(w * CE) / sum(w) over all samples, each run alone with the HF shift, w = 1 / sqrt(x) per sample."""
    total, weights = 0.0, 0.0
    for s in samples:
        pixels = torch.tensor(normalize(s["pixel_values"]).transpose(0, 3, 1, 2)) if len(s["pixel_values"]) else None
        logits = ref(input_ids=torch.tensor(s["input_ids"][None], dtype=torch.long), pixel_values=pixels).logits[0]
        targets = torch.tensor(s["labels"][1:], dtype=torch.long)
        ce = torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="none")
        x = int((targets != IGNORE).sum())
        w = 1.0 / math.sqrt(x)
        total = total + w * ce.sum()
        weights += w * x
    return total / weights


def _torch_step(ref, opt, sched, samples):
    """One update; returns (loss, lr used, gradient norm before clipping, {state dict key: gradient})."""
    opt.zero_grad()
    loss = _torch_loss(ref, samples)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM.max_grad_norm)
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    return loss.item(), lr, norm.item(), grads


def _our_layout(ref, tensors: dict):
    """A torch {state dict key: tensor} dict (params or gradients) in our param layout, by the checkpoint maps."""
    return from_state_dict({k: v.detach() for k, v in tensors.items()}, ref.config)[1]


# --------------------------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------------------------


def _keep_gradients() -> optax.GradientTransformation:
    """A probe for the front of the chain: its state is the last gradients the step fed the optimiser."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def _ours(model, params):
    """The step and optimiser as train/trainer.py builds them (no freezing flags, so no lr rules: all trains)."""
    tx = optax.chain(_keep_gradients(), optim.build_optimizer(OPTIM, params, TOTAL_STEPS))
    step = make_train_step(model, tx, optim.schedule(OPTIM, TOTAL_STEPS),
                           trainable=optim.trainable_mask(OPTIM, params), vocab_chunk=VOCAB_CHUNK)
    return jax.jit(step), TrainState.create(params, tx, jax.random.PRNGKey(0))


def _worst(ours, theirs, relative: bool):
    """(error, path) of the worst tensor: max |a - b| (/ max |b| when relative)."""
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    worst = (0.0, "")
    for path, b in jax.tree_util.tree_flatten_with_path(theirs)[0]:
        err = max_diff(flat_ours[path], b)
        if relative:
            scale = float(np.max(np.abs(np.asarray(b))))
            err = err / scale if scale else (0.0 if err == 0 else math.inf)
        worst = max(worst, (err, optim.param_path(path)))
    return worst


@pytest.fixture(scope="module")
def run():
    """STEPS updates on three different batches of the same shapes, both sides; what each step reported."""
    ref = tiny_internvl("qwen2").train()  # every dropout of the tiny config is 0: train() changes nothing else
    model, params = from_state_dict(ref.state_dict(), ref.config)
    opt, sched = _torch_optimizer(ref)
    step, state = _ours(model, params)
    steps = []
    for t in range(STEPS):
        samples = _samples(seed=t)
        state, metrics = step(state, _pack(samples))
        loss, lr, norm, grads = _torch_step(ref, opt, sched, samples)
        steps.append(dict(metrics=jax.device_get(metrics), grads=jax.device_get(state.opt_state[0]), loss=loss,
                          lr=lr, norm=norm, torch_grads=_our_layout(ref, grads)))
    return dict(ref=ref, params=params, state=state, steps=steps,
                torch_params=_our_layout(ref, dict(ref.named_parameters())))


# --------------------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------------------


def test_hand_packed_rows_are_the_packers_rows():
    """The rows above are the contract's; train/data/packing.py builds the same from the same samples."""
    from train.data.packing import PackConfig, pack

    samples = _samples(seed=0)
    cfg = PackConfig(max_tokens=L, max_tiles=T, tile_size=IMAGE_SIZE, img_context_id=IMAGE_TOKEN_ID,
                     img_start_id=IMG_START, img_end_id=IMG_END, tokens_per_tile=TOKENS_PER_TILE,
                     loss_mode="square")
    rows = list(pack(samples, cfg))
    assert [stats.members for _, stats in rows] == [[("parity", i + 1) for i in members] for members in ROWS]
    ours = _pack(samples)
    packed = {k: np.stack([row[k] for row, _ in rows]) for k in rows[0][0]}
    assert sorted(packed) == sorted(ours)
    for key in ours:
        np.testing.assert_array_equal(packed[key], ours[key], strict=True, err_msg=key)


def test_the_torch_param_groups_are_our_decay_mask(run):
    """The torch grouping, carried into our layout as 1/0 tensors, is train.optim's decay mask leaf by leaf."""
    ref = run["ref"]
    flags = {n: torch.full(p.shape, float(_torch_decays(n))) for n, p in ref.named_parameters()}
    carried = _our_layout(ref, flags)
    mask = optim.decay_mask(OPTIM, run["params"])
    flat_mask = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(carried)[0]:
        values = np.unique(np.asarray(leaf))
        assert len(values) == 1, f"{optim.param_path(path)} mixes decayed and undecayed torch tensors"
        assert bool(values[0]) == flat_mask[path], optim.param_path(path)
    assert 0 < sum(_torch_decays(n) for n, _ in ref.named_parameters()) < len(list(ref.parameters()))


def test_loss_lr_and_gradient_norm_match_torch_every_step(run):
    for t, s in enumerate(run["steps"]):
        m = s["metrics"]
        assert m["finite"] == 1.0
        assert abs(m["loss"] - s["loss"]) <= TOL_LOSS * abs(s["loss"]), (t, m["loss"], s["loss"])
        assert m["lr"] == pytest.approx(s["lr"], rel=TOL_LR, abs=0.0), t
        assert abs(m["grad_norm"] - s["norm"]) <= TOL_GRAD * s["norm"], (t, m["grad_norm"], s["norm"])
        assert s["norm"] > OPTIM.max_grad_norm, "the clipping must be active for the comparison to show it"
    assert [s["lr"] for s in run["steps"]] == pytest.approx([0.0, OPTIM.lr, 0.75 * OPTIM.lr], rel=TOL_LR)


def test_gradients_of_the_packed_step_match_torch_per_tensor(run):
    for t, s in enumerate(run["steps"]):
        err, path = _worst(s["grads"], s["torch_grads"], relative=True)
        assert err <= TOL_GRAD, f"step {t}: {path} relative error {err:.2e}"


def test_params_after_three_steps_match_torch(run):
    assert int(run["state"].step) == STEPS
    err, path = _worst(run["state"].params, run["torch_params"], relative=False)
    assert err <= TOL_PARAMS, f"{path}: {err:.2e}"
    moved, _ = _worst(run["state"].params, run["params"], relative=False)
    assert moved > 100 * TOL_PARAMS  # the updates are large enough for the comparison to mean something
