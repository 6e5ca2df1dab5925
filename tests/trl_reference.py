"""TRL's own DPO loss (trl 0.28, pinned), callable on plain tensors: ``TRLLoss(loss_type, beta, ...)``.

trl 0.28 asks transformers whether optional packages (weave, mergekit, ...) are installed; transformers 5
answers with a tuple, which is always true, so importing ``trl.trainer.dpo_trainer`` would import packages that
are not there. The availability checks are answered from ``importlib`` before the trainer module is imported.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch


def _trl():
    import trl.import_utils as iu

    for name in dir(iu):
        fn = getattr(iu, name)
        if name.startswith("is_") and name.endswith("_available") and callable(fn):
            package = name[3:-len("_available")]
            setattr(iu, name, lambda package=package, **_: importlib.util.find_spec(package) is not None)
    from trl.trainer import dpo_trainer, utils

    return dpo_trainer, utils


class TRLLoss:
    """``DPOTrainer.dpo_loss`` and its loss-type mix (``_compute_loss`` of trl 0.28) on a stand-in trainer: one
    process, the given beta and label smoothing, a fresh ``RunningMoments`` for BCO-pair's shift."""

    def __init__(self, loss_types, loss_weights, beta: float = 0.1, label_smoothing: float = 0.0):
        dpo_trainer, utils = _trl()
        accelerator = SimpleNamespace(device=torch.device("cpu"), use_distributed=False, is_main_process=True)
        self.fake = SimpleNamespace(
            accelerator=accelerator, reference_free=False, beta=beta, label_smoothing=label_smoothing,
            f_divergence_type=dpo_trainer.FDivergenceType.REVERSE_KL, f_divergence_params={},
            running=utils.RunningMoments(accelerator), loss_type=list(loss_types))
        self.dpo_loss = dpo_trainer.DPOTrainer.dpo_loss
        self.loss_types, self.loss_weights = list(loss_types), list(loss_weights)

    def __call__(self, pc, pr, rc, rr, nll=None):
        """Float64/32 tensors [N] -> (loss [], {loss type: per-pair losses [N]}), as the trainer mixes them."""
        total, terms = 0, {}
        for t, w in zip(self.loss_types, self.loss_weights):
            losses, _, _ = self.dpo_loss(self.fake, pc, pr, rc, rr, t, {"nll_loss": nll})
            terms[t] = losses
            total = total + losses * w
        return total.mean(), terms

    @property
    def shift(self) -> float:
        return float(self.fake.running.mean)
