import pytest
import torch
import torch.nn.functional as F

from loopalign.objectives import ouro_entropy_objective, per_loop_token_kl, per_loop_token_losses, weighted_loop_loss


def _setup(T=3, B=2, S=6, H=8, V=11):
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(B, S, H, generator=g, requires_grad=True) for _ in range(T)]
    head = torch.nn.Linear(H, V, bias=False)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = -100
    return states, head, labels


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_per_loop_losses_match_full_cross_entropy(chunk):
    states, head, labels = _setup()
    losses, index = per_loop_token_losses(head, states, labels, chunk_size=chunk)
    for t, h in enumerate(states):
        ref = F.cross_entropy(head(h)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
        torch.testing.assert_close(losses[t].mean(), ref)
    assert losses.shape == (3, 2 * 5 - 1)  # one target masked


def test_chunked_gradients_equal_unchunked():
    states, head, labels = _setup()
    grads = []
    for chunk in (2, 4096):
        for s in states:
            s.grad = None
        head.weight.grad = None
        losses, _ = per_loop_token_losses(head, states, labels, chunk_size=chunk)
        weighted_loop_loss(losses, [0.2, 0.3, 0.5])[0].backward()
        grads.append((states[0].grad.clone(), head.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("chunk", [1, 4, 4096])
def test_frozen_head_fused_path_matches_autograd(chunk):
    """A frozen head (LoRA) takes the fused path: same losses and hidden-state gradients as plain
    autograd through full logits, for any per-token upstream gradient."""
    states, head, labels = _setup()
    head.weight.requires_grad_(False)
    upstream = torch.rand(3, 9, generator=torch.Generator().manual_seed(1))
    losses, _ = per_loop_token_losses(head, states, labels, chunk_size=chunk)
    assert losses.grad_fn is not None and "FrozenHeadCrossEntropy" in str(losses.grad_fn.next_functions)
    (losses * upstream).sum().backward()
    fused = [s.grad.clone() for s in states]
    for s in states:
        s.grad = None
    shift = labels[:, 1:].reshape(-1)
    keep = shift != -100
    for t, h in enumerate(states):
        ref = F.cross_entropy(head(h)[:, :-1].reshape(-1, 11)[keep], shift[keep], reduction="none")
        torch.testing.assert_close(losses[t], ref.detach())
        (ref * upstream[t]).sum().backward()
        torch.testing.assert_close(fused[t], h.grad)


def test_grad_loops_score_the_other_loops_without_autograd():
    states, head, labels = _setup()
    full, _ = per_loop_token_losses(head, states, labels)
    part, _ = per_loop_token_losses(head, states, labels, grad_loops=[False, False, True])
    torch.testing.assert_close(part, full.detach())
    assert part.requires_grad
    weighted_loop_loss(part, [0.0, 0.0, 1.0])[0].backward()
    assert states[0].grad is None and states[1].grad is None
    assert states[2].grad is not None and states[2].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="grad_loops has 2 entries for 3 loops"):
        per_loop_token_losses(head, states, labels, grad_loops=[True, True])


def test_weighted_and_entropy_objectives_by_hand():
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # T=2, N=2
    total, per_loop = weighted_loop_loss(losses, [0.0, 1.0])
    assert total.item() == 2.0 and per_loop.tolist() == [2.0, 2.0]
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # N=2, T=2
    obj, ent = ouro_entropy_objective(losses, p, beta=0.1)
    h0 = torch.log(torch.tensor(2.0))
    expected = ((0.5 * 1 + 0.5 * 2 - 0.1 * h0) + (3.0 - 0.0)) / 2
    torch.testing.assert_close(obj, expected)
    torch.testing.assert_close(ent, h0 / 2)
    with pytest.raises(ValueError, match="loop_weights has 3 entries for 2 loops"):
        weighted_loop_loss(losses, [1, 1, 1])


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_per_loop_kl_is_the_kl_of_the_full_distributions_at_the_labelled_positions(chunk):
    states, head, labels = _setup()
    g = torch.Generator().manual_seed(1)
    reference = [torch.randn(h.shape, generator=g) for h in states]
    kl, index = per_loop_token_kl(head, states, reference, labels, chunk_size=chunk)
    _, expected_index = per_loop_token_losses(head, states, labels)
    assert torch.equal(index, expected_index) and kl.shape == (3, 2 * 5 - 1)
    for t, (h, r) in enumerate(zip(states, reference)):
        p = F.log_softmax(head(r).reshape(-1, 11), -1)[index]
        q = F.log_softmax(head(h).reshape(-1, 11), -1)[index]
        torch.testing.assert_close(kl[t], (p.exp() * (p - q)).sum(-1))
    assert (kl > 0).all()
    # the gradient reaches the trained states only; against itself the KL is zero
    kl.sum().backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in states)
    same, _ = per_loop_token_kl(head, states, [h.detach() for h in states], labels, chunk_size=chunk)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="3 loops against 2 reference"):
        per_loop_token_kl(head, states, reference[:2], labels)
