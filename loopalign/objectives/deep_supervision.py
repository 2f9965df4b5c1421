"""Per-loop deep supervision: every loop's readout is trained on the target tokens.

Memory: the loss of each loop is computed over chunks of tokens, so at most one chunk of
``chunk_size x V`` logits lives at a time, never ``T x B x S x V``. A frozen head (LoRA training)
takes the fused path (:class:`FrozenHeadCrossEntropy`: the gradient is formed in the forward);
a trained head takes activation-checkpointed chunks.

Dtypes: the hidden states may come in another dtype than the head (accelerate's mixed precision
hands a bf16 model's outputs back in float32); each chunk is cast to the head's weight dtype
before the head matmul (under autocast the matmul runs in the autocast dtype), the gradient of
the hidden states comes back in their own dtype, and logsumexp / cross-entropy run in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loopalign.loops import head_dtype

__all__ = [
    "FrozenHeadCrossEntropy",
    "per_loop_token_kl",
    "per_loop_token_losses",
    "weighted_loop_loss",
    "ouro_entropy_objective",
    "ouro_gate_loss",
    "shifted_targets",
]


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [B,S] -> (flat indices into B*S of the positions that predict a label, their targets).

    Position s predicts labels[s+1]; positions whose target is ``ignore_index`` are dropped.
    """
    bsz, seq = labels.shape
    target = torch.full_like(labels, ignore_index)
    target[:, :-1] = labels[:, 1:]
    flat = target.reshape(-1)
    index = (flat != ignore_index).nonzero(as_tuple=True)[0]
    return index, flat[index]


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden.to(weight.dtype), weight).float()
    return F.cross_entropy(logits, target, reduction="none")


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden @ weight.T`` for a head that is not trained (LoRA).

    The loss of token i depends on hidden state i alone, so d loss_i / d h_i = (softmax_i -
    onehot_i) @ W is computed in the forward, chunk by chunk, while the chunk's logits exist.
    Backward only scales it by the incoming per-token gradient: the head costs two matmuls per
    token (logits and d h) instead of three under checkpointing (logits, their recomputation,
    d h), and no logits outlive their chunk. hidden [N,H], weight [V,H], target [N] -> [N] float32.
    ``hidden`` may differ in dtype from ``weight`` (cast per chunk); its gradient has its own dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_size):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = F.linear(hidden[start:end].to(weight.dtype), weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            y = target[start:end]
            losses[start:end] = lse - logits.gather(1, y[:, None]).squeeze(1)
            probs = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
            probs[torch.arange(end - start, device=probs.device), y] -= 1.0
            grad_hidden[start:end] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None


def per_loop_token_losses(
    lm_head: torch.nn.Module,
    loop_hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 2048,
    ignore_index: int = -100,
    grad_loops: list[bool] | None = None,
    score_loops: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every loop's readout at every labelled position.

    loop_hidden_states: T x [B,S,H]; labels [B,S] (unshifted, ``ignore_index`` = no loss).
    ``grad_loops`` (T bools, default all True): loops whose losses are differentiated; the others
    are computed without autograd (for logging: no backward through the head). ``score_loops``
    (T bools, default all True): loops not scored get a row of zeros and cost nothing.
    Returns (losses [T,N] float32, index [N] flat positions into B*S).
    """
    for name, flags in (("grad_loops", grad_loops), ("score_loops", score_loops)):
        if flags is not None and len(flags) != len(loop_hidden_states):
            raise ValueError(f"{name} has {len(flags)} entries for {len(loop_hidden_states)} loops")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    index, target = shifted_targets(labels, ignore_index)
    # A plain bias-free head is applied to its weight directly, under activation checkpointing. A
    # wrapped head (PEFT), or one whose weight DeepSpeed ZeRO-3 has partitioned (``ds_id``; it is
    # gathered only inside the module's own forward), is called as a module instead.
    plain = type(lm_head) is torch.nn.Linear and lm_head.bias is None and not hasattr(lm_head.weight, "ds_id")
    rows = []
    for t, hidden in enumerate(loop_hidden_states):
        if score_loops is not None and not score_loops[t]:
            rows.append(torch.zeros(index.shape[0], dtype=torch.float32, device=hidden.device))
            continue
        with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_loops is None or bool(grad_loops[t]))):
            rows.append(_loop_losses(lm_head, hidden, index, target, chunk_size, plain))
    return torch.stack(rows, dim=0), index


def per_loop_token_kl(
    lm_head: torch.nn.Module,
    loop_hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    reference_hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int = 2048,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(reference || model) of every loop's next-token distribution at every labelled position: the soft-target
    counterpart of :func:`per_loop_token_losses` (the reference's whole distribution, not its greedy token).

    loop_hidden_states, reference_hidden_states: T x [B,S,H] (the reference's without autograd, e.g. the base model
    with its adapters off); labels [B,S] (unshifted; they only mark the positions). Returns (KL [T,N] float32,
    index [N] flat positions into B*S). Computed in chunks of ``chunk_size`` positions, so at most two chunks of
    ``chunk_size x V`` logits live at a time."""
    if len(loop_hidden_states) != len(reference_hidden_states):
        raise ValueError(
            f"per_loop_token_kl: {len(loop_hidden_states)} loops against {len(reference_hidden_states)} reference ones"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    index, _ = shifted_targets(labels, ignore_index)
    dtype = head_dtype(lm_head)
    rows = []
    for hidden, reference in zip(loop_hidden_states, reference_hidden_states):
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        ref = reference.reshape(-1, reference.shape[-1]).index_select(0, index).detach()
        parts = []
        for start in range(0, flat.shape[0], chunk_size):
            with torch.no_grad():
                target = F.log_softmax(lm_head(ref[start : start + chunk_size].to(dtype)).float(), dim=-1)
            pred = F.log_softmax(lm_head(flat[start : start + chunk_size].to(dtype)).float(), dim=-1)
            parts.append((target.exp() * (target - pred)).sum(dim=-1))
        rows.append(torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32))
    return torch.stack(rows, dim=0), index


def _loop_losses(lm_head, hidden, index, target, chunk_size, plain) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    if plain and torch.is_grad_enabled() and flat.requires_grad and not lm_head.weight.requires_grad:
        return FrozenHeadCrossEntropy.apply(flat, lm_head.weight, target, chunk_size)
    dtype = None if plain else head_dtype(lm_head)
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        h, y = flat[start : start + chunk_size], target[start : start + chunk_size]
        if plain and torch.is_grad_enabled() and (h.requires_grad or lm_head.weight.requires_grad):
            parts.append(checkpoint(_chunk_ce, h, lm_head.weight, y, use_reentrant=False))
        elif plain:
            parts.append(_chunk_ce(h, lm_head.weight, y))
        else:
            parts.append(F.cross_entropy(lm_head(h if dtype is None else h.to(dtype)).float(), y, reduction="none"))
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)


def weighted_loop_loss(
    token_losses: torch.Tensor, loop_weights: torch.Tensor | list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_losses [T,N] -> (scalar sum_t w_t * mean_n L_tn, per-loop means [T]).

    loop_weights: [T], e.g. uniform 1/T, last-only one-hot, or a user list.
    """
    token_losses = token_losses.float()
    w = torch.as_tensor(loop_weights, dtype=torch.float32, device=token_losses.device)
    if w.shape != token_losses.shape[:1]:
        raise ValueError(f"loop_weights has {w.numel()} entries for {token_losses.shape[0]} loops")
    per_loop = token_losses.mean(dim=1) if token_losses.shape[1] else token_losses.new_zeros(token_losses.shape[0])
    return (w * per_loop).sum(), per_loop.detach()


def ouro_entropy_objective(
    token_losses: torch.Tensor, exit_probs: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ouro's stage-I objective: mean over tokens of sum_t p(t|x) L_t - beta * H(p(.|x)).

    token_losses [T,N]; exit_probs [N,T] at the same positions. Returns (scalar, entropy mean).
    """
    if exit_probs.shape != token_losses.t().shape:
        raise ValueError(f"exit_probs {list(exit_probs.shape)} must be [N,T] = {list(token_losses.t().shape)}")
    p = exit_probs.float()
    expected = (p * token_losses.float().t()).sum(-1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    if not expected.numel():
        return token_losses.sum() * 0.0, entropy.sum() * 0.0
    return (expected - beta * entropy).mean(), entropy.mean().detach()


def ouro_gate_loss(
    token_losses: torch.Tensor, gate_logits: torch.Tensor, k: float = 50.0, gamma: float = 0.005
) -> torch.Tensor:
    """Ouro's stage-II exit-gate loss (LM frozen, only the gate learns when to stop).

    token_losses [T,N] (detached inside), gate_logits [N,T] at the same positions. For t = 1..T-1
    (0-based): improvement I_t = max(0, L_{t-1} - L_t), target continuation w_t = sigmoid(k (I_t - gamma)),
    loss -[w_t log(1 - lambda_t) + (1 - w_t) log lambda_t] with lambda_t = sigmoid(gate_t); averaged
    over tokens, summed over t and divided by T.
    """
    num_loops = token_losses.shape[0]
    if gate_logits.shape != token_losses.t().shape:
        raise ValueError(f"gate_logits {list(gate_logits.shape)} must be [N,T] = {list(token_losses.t().shape)}")
    if num_loops < 2:
        return gate_logits.sum() * 0.0
    losses = token_losses.detach().float().t()  # [N,T]
    improvement = (losses[:, :-1] - losses[:, 1:]).clamp_min(0)  # [N,T-1], for t = 1..T-1
    w = torch.sigmoid(k * (improvement - gamma))
    g = gate_logits[:, 1:].float()
    # -[w log(1 - sigmoid(g)) + (1 - w) log sigmoid(g)] = BCE(g, target = 1 - w)
    per = F.binary_cross_entropy_with_logits(g, 1 - w, reduction="none")
    return per.mean(dim=0).sum() / num_loops
