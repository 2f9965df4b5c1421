import math

import pytest
import torch

from loopalign.objectives import probe_distillation_loss, probe_ranking_distillation_loss

YES, NO = 2, 3


def _logits(q_yes: list[list[float]]) -> torch.Tensor:
    """[T,B,4] logits whose Yes/No pair gives q(Yes) = q_yes[t][b] (other tokens: noise)."""
    q = torch.tensor(q_yes, dtype=torch.float64)
    logits = torch.randn(*q.shape, 4, dtype=torch.float64) * 3
    logits[..., YES] = torch.log(q)
    logits[..., NO] = torch.log1p(-q)
    return logits.float()


def test_soft_cross_entropy_by_hand():
    q = [[0.75, 0.2], [0.5, 0.9]]  # T=2, B=2
    p = [[1.0, 0.3], [0.6, 0.0]]
    loss = probe_distillation_loss(_logits(q), torch.tensor(p), YES, NO)
    expected = [
        sum(-(p[t][b] * math.log(q[t][b]) + (1 - p[t][b]) * math.log(1 - q[t][b])) for b in range(2)) / 2
        for t in range(2)
    ]
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_gradient_is_zero_where_the_verdict_equals_its_target():
    logits = _logits([[0.75, 0.4]]).requires_grad_(True)
    target = torch.tensor([[0.75, 0.9]], requires_grad=True)
    probe_distillation_loss(logits, target, YES, NO).sum().backward()
    assert target.grad is None  # a fixed target: nothing flows into it
    grad = logits.grad[0]
    # d/d logit_yes of -(p log q + (1-p) log(1-q)), averaged over B=2: (q - p) / 2
    torch.testing.assert_close(grad[0, YES], torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad[1, YES], torch.tensor((0.4 - 0.9) / 2), atol=1e-6, rtol=1e-5)
    assert grad[:, [0, 1]].abs().max() == 0  # only the two verdict tokens get a gradient


def test_weights_mask_records_and_an_empty_mask_gives_a_graph_carrying_zero():
    logits = _logits([[0.7, 0.1, 0.5], [0.6, 0.3, 0.5]]).requires_grad_(True)
    target = torch.tensor([[0.2, 0.9, 0.4], [0.8, 0.5, 0.1]])
    masked = probe_distillation_loss(logits, target, YES, NO, weight=torch.tensor([1.0, 0.0, 1.0]))
    kept = probe_distillation_loss(logits[:, [0, 2]], target[:, [0, 2]], YES, NO)
    torch.testing.assert_close(masked, kept)
    weighted = probe_distillation_loss(logits, target, YES, NO, weight=torch.tensor([3.0, 0.0, 1.0]))
    per_record = torch.stack([probe_distillation_loss(logits[:, [b]], target[:, [b]], YES, NO) for b in (0, 2)], 1)
    torch.testing.assert_close(weighted, (per_record * torch.tensor([3.0, 1.0])).sum(1) / 4)
    boolean = probe_distillation_loss(logits, target, YES, NO, weight=torch.tensor([True, False, True]))
    torch.testing.assert_close(boolean, masked)

    zero = probe_distillation_loss(logits, target, YES, NO, weight=torch.zeros(3))
    assert torch.equal(zero, torch.zeros(2)) and zero.requires_grad
    zero.sum().backward()
    assert logits.grad is not None and logits.grad.abs().max() == 0


def test_bf16_logits_give_a_float32_loss():
    logits = _logits([[0.75, 0.2]]).bfloat16()
    loss = probe_distillation_loss(logits, torch.tensor([[0.5, 0.5]], dtype=torch.bfloat16), YES, NO)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


@pytest.mark.parametrize(
    "logits_shape,target_shape,weight_shape,message",
    [
        ((2, 3, 4), (3, 2), None, r"target_probs must be \[T=2, B=3\]"),
        ((2, 3, 4), (2, 3), (2,), r"weight must be \[B=3\]"),
        ((3, 4), (1, 3), None, r"verdict_logits must be \[T,B,V\]"),
    ],
)
def test_shape_mismatches_fail_clearly(logits_shape, target_shape, weight_shape, message):
    weight = None if weight_shape is None else torch.ones(weight_shape)
    with pytest.raises(ValueError, match=message):
        probe_distillation_loss(torch.zeros(logits_shape), torch.zeros(target_shape), YES, NO, weight=weight)


def test_pairwise_form_by_hand_over_pairs_of_one_group():
    q = [[0.75, 0.2, 0.6, 0.9]]  # T=1, B=4: records 0, 1 in group 0; 2 alone in group 1; 3 in no group
    p = [[0.9, 0.3, 0.5, 0.1]]
    loss = probe_ranking_distillation_loss(_logits(q), torch.tensor(p), torch.tensor([0, 0, 1, -1]), YES, NO)

    def logit(x):
        return math.log(x / (1 - x))

    dz = logit(0.75) - logit(0.2)
    target = 1 / (1 + math.exp(-(logit(0.9) - logit(0.3))))
    expected = -(target * math.log(1 / (1 + math.exp(-dz))) + (1 - target) * math.log(1 / (1 + math.exp(dz))))
    torch.testing.assert_close(loss, torch.tensor([expected]), atol=1e-5, rtol=1e-5)


def test_pairwise_form_is_blind_to_a_groups_offset_and_the_absolute_form_is_not():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4)
    target = torch.rand(2, 6)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    shifted = logits.clone()
    shifted[:, 3:, YES] += 2.5  # group 1 leans to Yes as a whole: its ranking is unchanged
    before = probe_ranking_distillation_loss(logits, target, groups, YES, NO)
    torch.testing.assert_close(probe_ranking_distillation_loss(shifted, target, groups, YES, NO), before)
    assert (
        probe_distillation_loss(shifted, target, YES, NO) - probe_distillation_loss(logits, target, YES, NO)
    ).abs().min() > 1e-3
    # the ranking inside a group does matter: swap two records' verdicts within group 0
    swapped = logits.clone()
    swapped[:, [0, 1]] = logits[:, [1, 0]]
    assert (probe_ranking_distillation_loss(swapped, target, groups, YES, NO) - before).abs().min() > 1e-4


def test_pairwise_form_without_a_pair_gives_a_graph_carrying_zero_and_checks_shapes():
    logits = _logits([[0.7, 0.1, 0.5]]).requires_grad_(True)
    target = torch.tensor([[0.2, 0.9, 0.4]])
    zero = probe_ranking_distillation_loss(logits, target, torch.tensor([0, 1, -1]), YES, NO)
    assert torch.equal(zero, torch.zeros(1)) and zero.requires_grad
    zero.sum().backward()
    assert logits.grad.abs().max() == 0
    with pytest.raises(ValueError, match=r"groups must be \[B=3\]"):
        probe_ranking_distillation_loss(logits, target, torch.tensor([0, 1]), YES, NO)
    with pytest.raises(ValueError, match=r"target_probs must be \[T=1, B=3\]"):
        probe_ranking_distillation_loss(logits, target[:, :2], torch.tensor([0, 1, 2]), YES, NO)
