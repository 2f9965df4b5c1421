import math

import pytest
import torch

from loopalign.objectives import (
    consistency_loss,
    frozen_probe_loss,
    hidden_distillation_loss,
    ouro_gate_loss,
    probe_loss,
    verbal_log_probs,
)
from loopalign.probes import LoopProbes


def test_verbal_log_probs_renormalise_over_yes_and_no():
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])  # yes=1, no=0, token 2 ignored
    torch.testing.assert_close(verbal_log_probs(logits, yes_id=1, no_id=0), torch.log(torch.tensor([0.75])))


def test_consistency_loss_by_hand_and_gradient_only_to_verdict():
    verdict = torch.zeros(2, 1, 4, requires_grad=True)  # T=2, B=1: q(yes) = 0.5
    probe_logits = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)  # p = 0.5, 0.75
    loss = consistency_loss(verdict, probe_logits, yes_id=2, no_id=3)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), math.log(2.0)]))
    loss.sum().backward()
    assert probe_logits.grad is None  # the probe posterior is a detached target
    # d/d logit_yes of -(p log q + (1-p) log(1-q)) at q = 0.5 is q - p
    torch.testing.assert_close(verdict.grad[:, 0, 2], torch.tensor([0.0, -0.25]))
    # the loss is minimal when the verbal verdict equals the probe posterior
    v = torch.tensor([[[0.0, 0.0, math.log(3.0), 0.0]]])
    best = consistency_loss(v, torch.tensor([[math.log(3.0)]]), 2, 3)
    worse = consistency_loss(v, torch.tensor([[0.0]]), 2, 3)
    assert best.item() < consistency_loss(torch.zeros(1, 1, 4), torch.tensor([[math.log(3.0)]]), 2, 3).item()
    assert worse.item() > 0


def test_probe_loss_and_probes_learn_a_linear_signal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 8, generator=g)
    labels = (x[0, :, 0] > 0).long()
    probes = LoopProbes(2, 8)
    opt = torch.optim.Adam(probes.parameters(), lr=0.1)
    for _ in range(100):
        loss = probe_loss(probes(x), labels).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    acc = ((probes(x)[0] > 0).long() == labels).float().mean()
    assert acc > 0.95
    with pytest.raises(ValueError, match="probe features must be"):
        probes(torch.randn(3, 4, 8))


def test_frozen_probe_loss_reaches_features_only():
    probes = LoopProbes(2, 4).requires_grad_(False)
    feats = torch.randn(2, 3, 4, requires_grad=True)
    frozen_probe_loss(probes, feats, torch.tensor([1, 0, 1])).sum().backward()
    assert feats.grad is not None
    with pytest.raises(ValueError, match="must be frozen"):
        frozen_probe_loss(LoopProbes(2, 4), feats, torch.tensor([1, 0, 1]))


def test_hidden_distillation():
    base = torch.randn(2, 3, 4)
    assert hidden_distillation_loss(base.clone(), base).abs().max() < 1e-7
    assert hidden_distillation_loss(2 * base, base, kind="cosine").abs().max() < 1e-6
    torch.testing.assert_close(hidden_distillation_loss(2 * base, base), torch.ones(2))
    with pytest.raises(ValueError, match="unknown distillation kind"):
        hidden_distillation_loss(base, base, kind="l1")


def test_gate_loss_by_hand():
    # T=2, one token: loop 1 improves a lot over loop 0 -> target continuation w ~ 1 -> push lambda_1 to 0
    losses = torch.tensor([[3.0], [1.0]])
    gate = torch.zeros(1, 2, requires_grad=True)
    loss = ouro_gate_loss(losses, gate)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0) / 2))
    loss.backward()
    assert gate.grad[0, 1] > 0 and gate.grad[0, 0] == 0  # descending lowers lambda_1; loop 0's gate is untouched
