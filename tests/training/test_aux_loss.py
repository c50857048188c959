"""Auxiliary losses reach the training objective through ``Mechanism.aux_loss()`` and ``Backbone.auxiliary_loss``."""

from __future__ import annotations

import copy

import pytest
import torch

from attnzoo import models
from attnzoo.training import TrainConfig, train

# learned_sparse's mask predictor gets no gradient from the classification loss (its top-k passes none): it learns
# only from its auxiliary loss, so a change of its weights shows that loss reached the objective.
PREDICTOR = ("predict_q.weight", "predict_k.weight", "token_basis", "basis_back")
MIXERS = ["learned_sparse", "mixture_of_heads", "routing", "mhsa"]


def build() -> models.Backbone:
    torch.manual_seed(0)
    return models.create("tiny", MIXERS, num_classes=10, in_chans=1, img_size=28)


def test_backbone_sums_the_aux_loss_of_every_mechanism():
    model = build().train()
    model(torch.randn(2, 1, 28, 28))
    own = [m.aux_loss() for m in model.modules() if callable(getattr(m, "aux_loss", None))]
    own = [loss for loss in own if loss is not None]
    assert len(own) == sum(models.SIZES["tiny"].depths[:3])  # one per block of the three stages with such a mixer
    torch.testing.assert_close(model.auxiliary_loss(), sum(own))
    model.eval()(torch.randn(2, 1, 28, 28))
    assert model.auxiliary_loss() is None  # eval forwards leave no loss behind


def test_copies_start_without_the_last_aux_loss():
    model = build().train()
    model(torch.randn(2, 1, 28, 28))
    assert copy.deepcopy(model).auxiliary_loss() is None and model.auxiliary_loss() is not None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_step_descends_the_aux_loss(tmp_path):
    """One real training run: the predictor, reachable only through its aux loss, moves away from its init."""
    before = {k: v.clone() for k, v in build().state_dict().items() if k.endswith(PREDICTOR)}
    assert len(before) == len(PREDICTOR)
    config = TrainConfig(mixers=MIXERS, out=str(tmp_path / "run"), dataset="synthetic", batch_size=32, limit_train=64,
                         limit_eval=32, weight_decay=0.0)  # fmt: skip
    train(config, show_progress=False, device="cpu")
    after = models.load(tmp_path / "run").state_dict()
    moved = {k: float((after[k] - v).abs().max()) for k, v in before.items()}
    assert all(d > 0 for d in moved.values()), moved
