"""Per-loop outputs of a looped model, exit distributions, and per-loop readouts.

Shapes: B batch, S sequence, H hidden, V vocabulary, T loops, L layers per loop.
"""

from __future__ import annotations

import argparse
import numbers
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .compat import CACHE_FIELD

__all__ = [
    "OuroModelOutput",
    "OuroCausalLMOutput",
    "exit_distribution",
    "threshold_exit_index",
    "resolve_exit",
    "loop_logits",
    "gather_positions",
    "head_dtype",
    "parse_int_set",
    "parse_loop_counts",
    "parse_loop_indices",
    "int_set_type",
]


@dataclass
class OuroModelOutput(ModelOutput):
    """Output of the looped decoder.

    last_hidden_state: [B,S,H], the normed state after the last loop.
    loop_hidden_states: T x [B,S,H], the normed state after each loop (what enters the next loop).
    gate_logits: T x [B,S], the exit gate's raw output after each loop.
    layer_hidden_states: T x L x [B,S,H], the residual stream after each layer in each loop.
    cache: the per-(loop, layer) KV cache, with ``use_cache``.
    """

    last_hidden_state: torch.Tensor | None = None
    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    gate_logits: tuple[torch.Tensor, ...] | None = None
    layer_hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
    # the KV cache, under the name the installed transformers' ``generate`` reads (loopalign.compat);
    # ``.cache`` and ``.past_key_values`` both work on every supported release
    if CACHE_FIELD == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None

        @property
        def cache(self) -> Cache | None:
            return self.past_key_values


@dataclass
class OuroCausalLMOutput(ModelOutput):
    """Output of ``OuroForCausalLM``.

    loss: scalar next-token cross-entropy of ``logits`` (when labels are given).
    logits: [B,S,V] (or fewer positions with ``logits_to_keep``), the chosen exit's readout.
    loop_hidden_states / gate_logits / exit_probs ([B,S,T]): with ``output_loop_states=True``.
    exit_loop: [B,S], the loop each token exited at, for ``exit="threshold"``.
    layer_hidden_states: T x L x [B,S,H], with ``output_layer_states=True``.
    loop_logits: T x [B,S,V], the LM head on each loop's state, with ``output_loop_logits=True``.
    cache: the per-(loop, layer) KV cache, with ``use_cache``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # see OuroModelOutput
    if CACHE_FIELD == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None

        @property
        def cache(self) -> Cache | None:
            return self.past_key_values

    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    gate_logits: tuple[torch.Tensor, ...] | None = None
    exit_probs: torch.Tensor | None = None
    exit_loop: torch.Tensor | None = None
    layer_hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
    loop_logits: tuple[torch.Tensor, ...] | None = None


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """Ouro's exit distribution. gate_logits [..., T] -> exit_probs [..., T] (sums to 1).

    With lambda_t = sigmoid(gate_logits[..., t]): p_t = lambda_t * prod_{j<t}(1 - lambda_j) for
    t < T-1; the last loop takes the remaining mass prod_{j<T-1}(1 - lambda_j). Computed in float32.
    """
    lam = torch.sigmoid(gate_logits.float())
    num_loops = lam.shape[-1]
    if num_loops == 1:
        return torch.ones_like(lam)
    survive = torch.cumprod(1.0 - lam[..., :-1], dim=-1)  # prod_{j<=t}(1-lambda_j), t = 0..T-2
    before = torch.cat([torch.ones_like(lam[..., :1]), survive[..., :-1]], dim=-1)  # prod_{j<t}, t = 0..T-2
    return torch.cat([lam[..., :-1] * before, survive[..., -1:]], dim=-1)


def threshold_exit_index(exit_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per token, the first loop whose cumulative exit probability reaches ``threshold``
    (the last loop if none does). exit_probs [..., T] -> long [...]."""
    num_loops = exit_probs.shape[-1]
    reached = exit_probs.cumsum(-1) >= threshold
    reached[..., -1] = True
    return torch.argmax(reached.to(torch.int8), dim=-1).clamp(max=num_loops - 1)


def resolve_exit(exit: str | int, num_loops: int) -> tuple[str, int | None]:
    """Normalise an ``exit`` argument to (mode, fixed loop index or None).

    A loop index is 0-based, ``0 <= exit < num_loops``. Negative indices are refused (elsewhere in
    loopalign a negative loop means "none", so ``-1`` must not quietly mean the last loop: say
    ``exit="last"`` or ``num_loops - 1``)."""
    if isinstance(exit, bool):
        raise ValueError(f"exit must be 'last', 'threshold', 'expected' or a loop index, got {exit!r}")
    if isinstance(exit, numbers.Integral):
        exit = int(exit)
        if not 0 <= exit < num_loops:
            raise ValueError(
                f"exit loop index {exit} is out of range for num_loops={num_loops}: exit= takes a loop index "
                f"0..{num_loops - 1} (0-based; negative indices are not accepted, exit='last' reads the last loop)"
            )
        return "fixed", exit
    if isinstance(exit, str) and exit in ("last", "threshold", "expected"):
        return exit, None
    raise ValueError(f"unknown exit mode {exit!r}: exit= takes 'last', 'threshold', 'expected' or a loop index (int)")


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B,S,H], positions long [B,K] (or [K], shared by all rows) -> [B,K,H]."""
    bsz, seq = hidden.shape[:2]
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(bsz, -1)
    if positions.shape[0] != bsz:
        raise ValueError(f"positions has {positions.shape[0]} rows for a batch of {bsz}")
    if positions.numel() and (int(positions.max()) >= seq or int(positions.min()) < -seq):
        raise ValueError(f"a position in {positions.tolist()} is outside a sequence of length {seq}")
    positions = positions % seq
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def head_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of a head module's first floating-point parameter (None: it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def loop_logits(
    lm_head: torch.nn.Module,
    loop_hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    positions: torch.Tensor | None = None,
    loops: list[int] | None = None,
) -> torch.Tensor:
    """Per-loop logits at chosen positions only: -> [T', B, K, V].

    loop_hidden_states: T x [B,S,H]; positions: long [B,K] or [K] (None = every position, only
    when asked: that is T x B x S x V floats); loops: which loops (default all). The gathered states
    are cast to the head's dtype (under mixed precision accelerate hands a bf16 model's states back
    in float32).
    """
    loops = list(range(len(loop_hidden_states))) if loops is None else loops
    states = []
    for t in loops:
        h = loop_hidden_states[t]
        states.append(h if positions is None else gather_positions(h, positions))
    stacked = torch.stack(states, dim=0)
    dtype = head_dtype(lm_head)
    return lm_head(stacked if dtype is None else stacked.to(dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Loop selection. One parser for every option that names loops or layers. Two conventions, named apart:
#   loop counts (``loops``, ``eval_loops``, ``tp_loops``, ``eval_loop_counts``, logged ``loop_t``): 1-based, "run n loops";
#   loop indices (``lora_loops``, ``injection_loops``, ``extraction_loops``, hook sites): 0-based, "the i-th loop".


def parse_int_set(
    spec,
    option: str,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    allow_all: bool = False,
    what: str | None = None,
    example: str | None = None,
) -> tuple[int, ...] | None:
    """'0-3' | '0,2' | '1-2,5' | 3 | [0, 2] -> sorted unique ints in [minimum, maximum); 'all' or '' -> None
    when ``allow_all``. ``option`` names the setting in every error, ``what`` says what it holds."""
    example = example or f"'{minimum}-{minimum + 2}' or '{minimum},{minimum + 2}'"
    what = what or f"integers >= {minimum}"
    bad = ValueError(f"{option} must be {what} (e.g. {example}), got {spec!r}")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("all", "")):
        if allow_all:
            return None
        raise ValueError(f"{option} must be {what} (e.g. {example}); 'all' is not allowed here")
    values: list[int] = []
    try:
        if isinstance(spec, bool):
            raise bad
        if isinstance(spec, numbers.Integral):
            values = [int(spec)]
        elif isinstance(spec, str):
            for part in spec.replace(" ", "").split(","):
                if not part:
                    continue
                head, sep, tail = part[1:].partition("-")
                if sep:  # a range a-b (the first character may be a sign)
                    a, b = int(part[0] + head), int(tail)
                    if b < a:
                        raise bad
                    values.extend(range(a, b + 1))
                else:
                    values.append(int(part))
        else:
            for v in spec:
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise bad
                values.append(int(v))
    except (TypeError, ValueError):
        raise bad from None
    if not values:
        raise ValueError(f"{option} must be {what}, not empty (e.g. {example})")
    if min(values) < minimum:
        raise bad
    if maximum is not None and max(values) >= maximum:
        raise ValueError(f"{option}: {max(values)} is out of range; values must be < {maximum}, got {spec!r}")
    return tuple(sorted(set(values)))


def parse_loop_counts(spec, option: str = "loops", max_loops: int | None = None) -> list[int]:
    """Loop counts, 1-based ("run n loops"): '1-8' | '1,2,4' | 4 | [1, 2] -> sorted unique counts >= 1
    (<= ``max_loops`` when given)."""
    top = None if max_loops is None else max_loops + 1
    return list(
        parse_int_set(spec, option, minimum=1, maximum=top, what="loop counts >= 1", example="'1-8' or '1,2,4'")
    )


def parse_loop_indices(spec, option: str = "loop indices", num_loops: int | None = None) -> tuple[int, ...] | None:
    """Loop indices, 0-based ("the i-th loop"): '0-3' | '3' | [0, 3] | 'all' (-> None: every loop) -> sorted
    unique indices >= 0 (< ``num_loops`` when given)."""
    return parse_int_set(
        spec, option, minimum=0, maximum=num_loops, allow_all=True, what="0-based loop indices", example="'0-3' or '3'"
    )


def int_set_type(option: str, minimum: int = 0, allow_all: bool = False):
    """An argparse ``type=`` for :func:`parse_int_set` ('0-3', '0,2'; 'all' -> None with ``allow_all``): a bad value
    is an ``argparse.ArgumentTypeError`` naming ``option``."""

    def parse(text: str):
        try:
            return parse_int_set(text, option, minimum=minimum, allow_all=allow_all)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
