"""One MPO step against PyTorch: ``transformers.InternVLForConditionalGeneration`` with a frozen copy as the
reference, TRL's own loss mix (sigmoid 0.8 + bco_pair 0.2 + sft 1.0, its running shift) and ``torch.optim.AdamW``,
against our preference step (train/preference_step.py) on the same pairs packed by train/data/pairs.py.

Torch runs each sequence alone (batch of 1, the HF shift); a sequence log-prob is the sum of its answer tokens'
log-probs, the SFT term the token mean of the chosen answers' NLL. Ours packs two pairs in row 0 and one in row 1,
each pair's rejected sequence reading its pair's tiles again (image_index). The optimiser and schedule are
test_train_parity's (two AdamW groups, clipping active, warm-up then cosine).

Tolerance TOL (float32): loss and each term, relative; gradients per tensor max |ours - torch| / max |torch|;
parameters after 3 steps, max abs difference; the shift, relative to beta x the largest |sequence log-prob| (the
scale of the numbers whose differences make the rewards).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from convert.load import from_state_dict
from internvl_jax.processing import normalize
from reference import IMAGE_SIZE, IMAGE_TOKEN_ID, TOKENS_PER_TILE, tiny_internvl
from test_train_parity import IMG_END, IMG_START, OPTIM, TOTAL_STEPS, _keep_gradients, _our_layout, _torch_optimizer, _worst
from train import optim
from train.data.packing import PackConfig
from train.data.pairs import PAIR_ROWS
from train.loss import IGNORE
from train.preference import MPOConfig
from train.preference_step import PreferenceState, make_preference_step, pair_logps
from trl_reference import TRLLoss

TOL = 1e-5  # relative (loss, terms, gradients); params: max abs difference
TOL_DP = 1e-6  # 8 data-parallel devices vs one (float32 sums in another order): loss relative, the shift relative
# to beta x the largest |sequence log-prob|; the params after 3 steps as against torch (TOL)
STEPS = 3
L, T, P = 96, 4, 2
MPO = MPOConfig(max_pairs=P)
# a pair: prompt parts, chosen answer length, rejected answer length. Pairs 0 and 1 fill row 0 (2 pairs = P), 2 is row 1
PAIRS = [([("text", 4), ("image", 2), ("text", 3)], 6, 4),
         ([("text", 6)], 5, 7),
         ([("text", 3), ("image", 1), ("text", 5)], 3, 8)]


def _pair(prompt, n_chosen, n_rejected, rng, line):
    """A prepared pair as train/data/pairs.py's prepare_pair gives it (labels unshifted, on the answer only)."""
    ids, tiles = [], []
    for kind, n in prompt:
        if kind == "image":
            ids += [IMG_START] + [IMAGE_TOKEN_ID] * (n * TOKENS_PER_TILE) + [IMG_END]
            tiles += [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) for _ in range(n)]
        else:
            ids += rng.integers(1, IMG_START, n).tolist()
    halves = []
    for n in (n_chosen, n_rejected):
        answer = rng.integers(1, IMG_START, n).tolist()  # no id 0: TRL's nll ignores label 0
        seq = np.asarray(ids + answer, np.int32)
        labels = np.asarray([IGNORE] * len(ids) + answer, np.int32)
        halves.append((seq, labels, np.arange(len(seq), dtype=np.int32)))
    pixels = np.stack(tiles) if tiles else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return {"chosen": halves[0], "rejected": halves[1], "pixel_values": pixels, "dataset": "mpo", "line": line,
            "ref": None}


def _pairs(seed):
    rng = np.random.default_rng(seed)
    return [_pair(*spec, rng, i + 1) for i, spec in enumerate(PAIRS)]


def _batch(pairs, rows: int = 2):
    """The pairs packed two a row (the last row takes what is left), ``rows`` rows."""
    cfg = PackConfig(max_tokens=L, max_tiles=T, tile_size=IMAGE_SIZE, img_context_id=IMAGE_TOKEN_ID,
                     img_start_id=IMG_START, img_end_id=IMG_END, tokens_per_tile=TOKENS_PER_TILE, max_segments=P)
    packer = PAIR_ROWS.packer(cfg)
    pieces = [packer.expand(p)[0] for p in pairs]
    return PAIR_ROWS.build_batch([pieces[2 * r:2 * r + 2] for r in range(rows)], cfg, rows)


def _torch_logps(model, ids, labels, pixels):
    """(sum of the answer tokens' log-probs, their NLLs [n]) of one sequence, HF shift; pixels: uint8 levels,
    normalised as the original's transform does."""
    px = torch.tensor(normalize(pixels).transpose(0, 3, 1, 2)) if len(pixels) else None
    logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long), pixel_values=px).logits[0, :-1]
    targets = torch.tensor(labels[1:], dtype=torch.long)
    keep = targets != IGNORE
    token = torch.log_softmax(logits.float(), -1)[keep].gather(-1, targets[keep][:, None])[:, 0]
    return token.sum(), -token


def _torch_step(policy, reference, trl, opt, sched, pairs):
    opt.zero_grad()
    logps, ref_logps, nlls = [], [], []
    for p in pairs:
        row = []
        for half in ("chosen", "rejected"):
            ids, labels, _ = p[half]
            s, nll = _torch_logps(policy, ids, labels, p["pixel_values"])
            row.append(s)
            if half == "chosen":
                nlls.append(nll)
            with torch.no_grad():
                ref_logps.append(_torch_logps(reference, ids, labels, p["pixel_values"])[0])
        logps.append(torch.stack(row))
    logps, ref_logps = torch.stack(logps), torch.stack(ref_logps).reshape(-1, 2)
    loss, terms = trl(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], torch.cat(nlls).mean())
    loss.backward()
    grads = {n: q.grad.detach().clone() for n, q in policy.named_parameters()}
    torch.nn.utils.clip_grad_norm_(policy.parameters(), OPTIM.max_grad_norm)
    opt.step()
    sched.step()
    terms = {t: float(v.detach().mean()) for t, v in terms.items()}
    return loss.item(), terms, grads, trl.shift, float(logps.detach().abs().max())


def test_mpo_step_matches_torch_and_trl_for_three_steps():
    policy = tiny_internvl("qwen2").train()  # every dropout of the tiny config is 0
    reference = copy.deepcopy(policy).eval()
    for q in reference.parameters():
        q.requires_grad_(False)
    model, params = from_state_dict(policy.state_dict(), policy.config)
    ref_params = jax.tree.map(np.array, params)
    opt, sched = _torch_optimizer(policy)
    trl = TRLLoss(MPO.loss_types, MPO.loss_weights, beta=MPO.beta)
    tx = optax.chain(_keep_gradients(), optim.build_optimizer(OPTIM, params, TOTAL_STEPS))
    step = jax.jit(make_preference_step(model, tx, MPO, optim.schedule(OPTIM, TOTAL_STEPS),
                                        trainable=optim.trainable_mask(OPTIM, params), vocab_chunk=16))
    state = PreferenceState.create(params, tx, jax.random.PRNGKey(0))
    for t in range(STEPS):
        pairs = _pairs(seed=t)
        state, m = step(state, _batch(pairs), ref_params)
        loss, terms, grads, shift, scale = _torch_step(policy, reference, trl, opt, sched, pairs)
        m = jax.device_get(m)
        assert m["finite"] == 1.0 and m["pairs"] == len(PAIRS)
        assert abs(m["loss"] - loss) <= TOL * abs(loss), (t, m["loss"], loss)
        for name, ours in (("sigmoid", m["loss/sigmoid"]), ("bco_pair", m["loss/bco_pair"]), ("sft", m["nll"])):
            assert abs(ours - terms[name]) <= TOL * abs(terms[name]), (t, name, ours, terms[name])
        # a reward is beta x a difference of sequence log-probs: its float32 error scales with beta x |log-prob|
        assert abs(m["shift"] - shift) <= TOL * MPO.beta * scale, (t, m["shift"], shift)
        err, path = _worst(jax.device_get(state.opt_state[0]), _our_layout(policy, grads), relative=True)
        assert err <= TOL, f"step {t}: gradient of {path} relative error {err:.2e}"
        if t == 0:  # policy = reference: every reward, margin and the first shift are 0
            assert abs(m["margin"]) < 1e-6 and abs(m["shift"]) < 1e-6
    err, path = _worst(state.params, _our_layout(policy, dict(policy.named_parameters())), relative=False)
    assert err <= TOL, f"{path}: {err:.2e} after {STEPS} steps"
    moved, _ = _worst(state.params, params, relative=False)
    assert moved > 100 * TOL
    assert abs(m["margin"]) > 1e-3  # the later steps compared rewards that are not zero


def test_over_8_data_parallel_devices_the_shift_equals_the_single_device_run():
    """The issue's data-parallel check: 3 MPO steps on 8 rows of 2 pairs, on one device and with the rows split over
    8 simulated devices (dp rules: each device its row, params replicated): the shift (the running mean merges
    every row's rewards) and the loss agree within TOL_DP, the params within TOL. A reference unlike the policy makes the
    rewards and the shift non-zero from the first step."""
    import sharding
    from jax.sharding import NamedSharding, PartitionSpec

    from sharding.rules import get_rules
    from train.step import batch_shardings

    policy = tiny_internvl("qwen2")
    model, params = from_state_dict(policy.state_dict(), policy.config)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    ref_params = jax.tree_util.tree_unflatten(
        tree, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    tx = optim.build_optimizer(OPTIM, params, TOTAL_STEPS)
    fn = make_preference_step(model, tx, MPO, trainable=optim.trainable_mask(OPTIM, params), vocab_chunk=16)
    batches = [_batch([_pair(*PAIRS[i % 2], np.random.default_rng(100 * t + i), i + 1) for i in range(16)], rows=8)
               for t in range(STEPS)]
    mesh = sharding.make_mesh(8, 1, 1)
    rep = NamedSharding(mesh, PartitionSpec())
    batch_sh = batch_shardings(batches[0], mesh, get_rules("dp"))
    runs = {"single": jax.jit(fn), "8 devices": jax.jit(fn, in_shardings=(rep, batch_sh, rep), out_shardings=rep)}
    out = {}
    for name, step in runs.items():
        state, shifts, losses = PreferenceState.create(params, tx, jax.random.PRNGKey(0)), [], []
        for batch in batches:
            state, m = step(state, batch, ref_params)
            shifts.append(float(m["shift"]))
            losses.append(float(m["loss"]))
            assert m["pairs"] == 16
        out[name] = (np.array(shifts), np.array(losses), jax.device_get(state.params))
    (s1, l1, p1), (s8, l8, p8) = out.values()
    # as in the torch comparison, the shift's float32 error scales with beta x the largest |sequence log-prob|
    scale = MPO.beta * max(float(jnp.abs(pair_logps(model, p, batches[0], P)[0]).max()) for p in (params, ref_params))
    print(f"shift per step {s1}, 8 devices - single {np.abs(s8 - s1).max():.2e} (scale {scale:.2f}); "
          f"loss {np.abs(l8 - l1).max():.2e}")
    assert np.abs(s1).max() > 1e-3  # the rewards are not zero
    np.testing.assert_allclose(s8, s1, rtol=0, atol=TOL_DP * scale)
    np.testing.assert_allclose(l8, l1, rtol=TOL_DP, atol=0)
    err, path = _worst(p8, p1, relative=False)
    assert err <= TOL, f"{path}: {err:.2e}"  # Adam scales the noise of near-zero gradients (k bias) up to lr size
