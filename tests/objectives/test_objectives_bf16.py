"""The objectives under mixed dtypes: what bf16 training hands them.

accelerate's mixed precision returns a bf16 model's outputs in float32 (convert_outputs_to_fp32) while its head
stays bf16; hooks capture bf16 features; the trainers' loss code runs under autocast. Each objective takes any of
these: the per-loop cross-entropy casts the hidden states to the head's dtype before the head matmul (the
gradient comes back in the hidden states' own dtype) and reduces in float32; the probes and the RR terms run in
float32 with autocast off; every loss comes back float32.
"""

import pytest
import torch
import torch.nn.functional as F

from loopalign.objectives import (
    consistency_loss,
    frozen_probe_loss,
    hidden_distillation_loss,
    ouro_entropy_objective,
    ouro_gate_loss,
    per_loop_token_kl,
    per_loop_token_losses,
    probe_loss,
    shifted_targets,
)
from loopalign.probes import LinearProbe, LoopProbes

BF16 = torch.bfloat16


class WrappedHead(torch.nn.Module):
    """A head that is not a plain bias-free Linear (as PEFT's wrapper is): called as a module."""

    def __init__(self, linear):
        super().__init__()
        self.base_layer = linear

    def forward(self, x):
        return self.base_layer(x)


def _setup(hidden_dtype, head_dtype, T=2, B=2, S=5, H=16, V=37):
    g = torch.Generator().manual_seed(0)
    states = [(torch.randn(B, S, H, generator=g) * 2).to(hidden_dtype).requires_grad_(True) for _ in range(T)]
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
    head = head.to(head_dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = -100
    return states, head, labels


def _reference(states, head, labels):
    """Per-token cross-entropy computed the plain autograd way, in the head's dtype, reduced in float32."""
    index, target = shifted_targets(labels)
    rows = []
    for h in states:
        flat = h.reshape(-1, h.shape[-1])[index].to(head.weight.dtype)
        rows.append(F.cross_entropy(F.linear(flat, head.weight).float(), target, reduction="none"))
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["fused_frozen_head", "checkpointed_trained_head", "module_head"])
@pytest.mark.parametrize(
    "hidden_dtype,head_dtype", [(torch.float32, BF16), (BF16, torch.float32), (BF16, BF16)], ids=str
)
def test_per_loop_losses_take_hidden_states_of_another_dtype_than_the_head(path, hidden_dtype, head_dtype):
    states, head, labels = _setup(hidden_dtype, head_dtype)
    head.weight.requires_grad_(path == "checkpointed_trained_head")
    module = WrappedHead(head) if path == "module_head" else head

    losses, _ = per_loop_token_losses(module, states, labels, chunk_size=4)
    upstream = torch.rand(losses.shape, generator=torch.Generator().manual_seed(1))
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    if path == "fused_frozen_head":
        assert "FrozenHeadCrossEntropy" in str(losses.grad_fn.next_functions)
    (losses * upstream).sum().backward()
    grads = [s.grad.clone() for s in states]
    head_grad = None if head.weight.grad is None else head.weight.grad.clone()
    for s in states:
        s.grad = None
    head.weight.grad = None

    ref = _reference(states, head, labels)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(losses, ref.detach(), rtol=1e-5, atol=1e-5)
    for got, s in zip(grads, states):
        assert got.dtype == hidden_dtype  # the gradient comes back in the hidden states' dtype
        # the fused path rounds (softmax - onehot) to the head's dtype before the per-token scale, autograd after
        # it: they differ by bf16 rounding (measured up to 0.9% of the gradient's scale)
        scale = float(s.grad.abs().max())
        torch.testing.assert_close(got.float(), s.grad.float(), rtol=0, atol=2e-2 * scale)
    if head_grad is not None:
        assert head_grad.dtype == head_dtype
        # summed over chunks in bf16 (autograd accumulates a leaf's gradient in its dtype; measured up to 0.34% of
        # the gradient's scale)
        ref_grad = head.weight.grad.float()
        torch.testing.assert_close(head_grad.float(), ref_grad, rtol=0, atol=2e-2 * float(ref_grad.abs().max()))


def test_per_loop_losses_under_bf16_autocast_follow_the_autocast_dtype():
    """A float32 model under autocast: the head matmul runs in bf16, the losses are float32 and match the
    float32 ones to bf16 rounding; the gradients stay float32."""
    states, head, labels = _setup(torch.float32, torch.float32)
    head.weight.requires_grad_(False)
    exact, _ = per_loop_token_losses(head, states, labels)
    with torch.autocast("cpu", dtype=BF16):
        losses, _ = per_loop_token_losses(head, states, labels)
    assert losses.dtype == torch.float32
    bf16_head = torch.nn.Linear(16, 37, bias=False).to(BF16)
    bf16_head.weight.data.copy_(head.weight.data)
    torch.testing.assert_close(losses, _reference(states, bf16_head, labels).detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(losses, exact, rtol=1e-6, atol=1e-6)  # bf16 did run
    torch.testing.assert_close(losses, exact, rtol=3e-2, atol=3e-2)
    losses.sum().backward()
    assert all(s.grad.dtype == torch.float32 and torch.isfinite(s.grad).all() for s in states)


def test_probes_and_rr_terms_run_in_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 6, 16, generator=g).to(BF16)  # captured from a bf16 model
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    probes = LoopProbes(3, 16)
    with torch.no_grad():
        probes.weight.copy_(torch.randn(3, 16, generator=g))
        probes.bias.copy_(torch.randn(3, generator=g))
    frozen = [
        LinearProbe(weight=torch.randn(16, generator=g), bias=torch.tensor(0.3), mean=torch.randn(16, generator=g),
                    std=torch.rand(16, generator=g) + 0.5)
        for _ in range(3)
    ]  # fmt: skip
    base = feats.float() + 0.1 * torch.randn(3, 6, 16, generator=g)

    def terms(x):
        logits = probes(x)
        return [logits, probe_loss(logits, labels), frozen_probe_loss(frozen, x, labels)] + [
            hidden_distillation_loss(x, base, kind) for kind in ("mse", "cosine")
        ]

    exact = terms(feats.float())  # float32 features, no autocast
    with torch.autocast("cpu", dtype=BF16):
        got = terms(feats)
    for e, t in zip(exact, got):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, e, rtol=0, atol=0)  # the same float32 computation, bit for bit


def test_verdict_gate_and_exit_terms_take_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    verdict = torch.randn(3, 4, 11, generator=g)
    probe_logits = torch.randn(3, 4, generator=g)
    token_losses = torch.rand(3, 7, generator=g) * 5
    gates = torch.randn(7, 3, generator=g)
    exit_probs = torch.softmax(torch.randn(7, 3, generator=g), -1)

    def terms(cast):
        return [
            consistency_loss(cast(verdict), cast(probe_logits), 2, 5),
            ouro_gate_loss(cast(token_losses), cast(gates)),
            ouro_entropy_objective(cast(token_losses), cast(exit_probs))[0],
        ]

    exact = terms(lambda x: x.to(BF16).float())  # the same bf16-rounded inputs, in float32
    with torch.autocast("cpu", dtype=BF16):
        got = terms(lambda x: x.to(BF16))
    for e, t in zip(exact, got):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "hidden_dtype,head_dtype", [(torch.float32, BF16), (BF16, torch.float32), (BF16, BF16)], ids=str
)
def test_per_loop_kl_takes_mixed_dtypes_and_autocast(hidden_dtype, head_dtype):
    """replay_kind='kl' under bf16 training: the KL comes back float32 and finite, the gradient in the hidden states'
    dtype, and it matches the float32 KL to bf16 rounding, with and without autocast."""
    states, head, labels = _setup(hidden_dtype, head_dtype)
    head.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    reference = [(torch.randn(s.shape, generator=g) * 2).to(hidden_dtype) for s in states]
    exact_head = torch.nn.Linear(16, 37, bias=False)
    exact_head.weight.data.copy_(head.weight.data.float())
    exact, _ = per_loop_token_kl(
        exact_head, [s.detach().float() for s in states], [r.float() for r in reference], labels
    )
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            kl, _ = per_loop_token_kl(head, states, reference, labels, chunk_size=4)
        assert kl.dtype == torch.float32 and torch.isfinite(kl).all()
        torch.testing.assert_close(kl, exact, rtol=0.1, atol=0.05 * float(exact.abs().max()))
        kl.sum().backward()
        assert all(s.grad is not None and s.grad.dtype == hidden_dtype for s in states)
        for s in states:
            s.grad = None
