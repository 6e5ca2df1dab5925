"""The MPO loss terms (train/preference.py) against TRL's own DPOTrainer.dpo_loss (trl 0.28, pinned)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from train.preference import MPOConfig, Shift, objective, pair_losses, sequence_logps
from trl_reference import TRLLoss

TOL = 1e-6  # float32 on both sides


def _logps(rng, n):
    """Policy and reference sequence log-probs [n, 2] like a model's: sums of negative token log-probs."""
    ref = -rng.uniform(5, 40, size=(n, 2)).astype(np.float32)
    return (ref + rng.normal(0, 2, size=(n, 2))).astype(np.float32), ref


def _trl_call(trl, policy, ref, nll):
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    return trl(t(policy[:, 0]), t(policy[:, 1]), t(ref[:, 0]), t(ref[:, 1]), t(nll))


def test_mpo_mix_and_running_shift_match_trl_over_steps():
    cfg = MPOConfig()  # sigmoid, bco_pair, sft with 0.8 / 0.2 / 1.0, beta 0.1: the InternVL scripts' mix
    trl = TRLLoss(cfg.loss_types, cfg.loss_weights, beta=cfg.beta)
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda p, r, m, s, nll: objective(cfg, p, r, m, s, nll, pairs_total=jnp.sum(m),
                                                   tokens_total=1.0))
    shift = Shift.zero()
    for step in range(6):
        n = 5 + step % 3
        policy, ref = _logps(rng, n)
        nll = np.float32(rng.uniform(0.5, 3))
        # two padding pairs with garbage log-probs: they must change nothing
        pad_p, pad_r = _logps(rng, 2)
        mask = np.array([True] * n + [False] * 2)
        loss, shift, sums = fn(np.concatenate([policy, pad_p * 9]), np.concatenate([ref, pad_r]), mask, shift, nll)
        want, terms = _trl_call(trl, policy, ref, nll)
        assert abs(float(loss) - float(want)) <= TOL * max(1.0, abs(float(want))), step
        assert abs(float(shift.mean) - trl.shift) <= TOL, step
        for t in ("sigmoid", "bco_pair"):
            np.testing.assert_allclose(float(sums[t]), float(terms[t].sum()), rtol=TOL, atol=TOL)
    assert float(shift.count) == 6


@pytest.mark.parametrize("loss_type,smoothing", [("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("sigmoid", 0.1),
                                                 ("exo_pair", 0.0), ("exo_pair", 0.2), ("apo_zero", 0.0)])
def test_each_pair_loss_matches_trl(loss_type, smoothing):
    cfg = MPOConfig(loss_types=(loss_type,), loss_weights=(1.0,), beta=0.3, label_smoothing=smoothing)
    trl = TRLLoss([loss_type], [1.0], beta=0.3, label_smoothing=smoothing)
    policy, ref = _logps(np.random.default_rng(1), 16)
    if loss_type == "ipo":  # TRL hands ipo length-normalised log-probs (concatenated_forward divides them)
        policy, ref = policy / 12, ref / 12
    ours = pair_losses(cfg, jnp.asarray(policy), jnp.asarray(ref), jnp.zeros(()))[loss_type]
    _, terms = _trl_call(trl, policy, ref, np.float32(0))
    np.testing.assert_allclose(np.asarray(ours), terms[loss_type].numpy(), rtol=TOL, atol=TOL)


def test_sequence_logps_sum_each_half_of_each_pair():
    rng = np.random.default_rng(2)
    b, length, pairs = 2, 24, 3
    token = rng.normal(size=(b, length)).astype(np.float32)
    seg = np.zeros((b, length), np.int32)
    seg[0, :6], seg[0, 6:10], seg[0, 10:20] = 1, 2, 3  # row 0: pair 0 whole, pair 1 chosen only
    seg[1, 2:8], seg[1, 8:12], seg[1, 12:16], seg[1, 16:22] = 1, 2, 5, 6  # row 1: pairs 0 and 2
    completion = rng.random((b, length)) < 0.6
    want = np.zeros((b, pairs, 2))
    lengths = np.zeros((b, pairs, 2))
    for i in range(b):
        for j in range(length):
            if seg[i, j] and completion[i, j]:
                want[i, (seg[i, j] - 1) // 2, (seg[i, j] - 1) % 2] += token[i, j]
                lengths[i, (seg[i, j] - 1) // 2, (seg[i, j] - 1) % 2] += 1
    got, got_len = sequence_logps(token, seg, completion, pairs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_len), lengths)
    normalised, _ = sequence_logps(token, seg, completion, pairs, normalise=True)
    np.testing.assert_allclose(np.asarray(normalised), want / np.maximum(lengths, 1), rtol=1e-6, atol=1e-6)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown MPO loss type.s. dpo"):
        MPOConfig(loss_types=("dpo",), loss_weights=(1.0,))
    with pytest.raises(ValueError, match="mpo.loss_weights has 2 values for 3"):
        MPOConfig(loss_weights=(0.8, 0.2)).check()
    with pytest.raises(ValueError, match="MPO reference 'model'"):
        MPOConfig(reference="model")
