"""Huginn ("raven") recurrent-depth LM, written for loopalign: every step's state is exposed and can be trained.

Architecture (facts in ``docs/families.md``): ``e = wte(ids) * embed_scale``; the prelude blocks turn it into the
embedding injected at every step; the latent state ``s`` starts random (or zero, or given) and each recurrence
step runs ``s = core_blocks(adapter(cat(s, e)))``; then ``ln_f``, the coda blocks, ``ln_f`` again and the LM head.
Any step's state can be read out the same way (``loop_hidden_states``: the ``ln_f`` output after the coda).

A "loop" in loopalign's contract is one recurrence step; its looped layers are the recurrent-block layers
(:class:`HuginnRecurrentBlock`), which set the current loop (:func:`current_loop`) while they run. The coda,
run as the readout of step t, also runs at loop t, and the prelude at loop 0 (it feeds every step, as loop 0
does), so loop-routed LoRA acting on loop t changes loop t and what follows, never an earlier step's readout.

Beyond the reference modeling code: the attention mask is honoured (padding is masked and positions count real
tokens only), gradients flow through the steps chosen by ``num_steps=(n_no_grad, n_grad)`` (an int runs every
step with gradients), the KV cache has one slot per (step, layer) for any block size, attention is SDPA, and
gradient checkpointing wraps each (step, layer) call.

State-dict keys equal the released checkpoints' (``transformer.wte``, ``transformer.prelude.i``,
``transformer.adapter``, ``transformer.core_block.i``, ``transformer.coda.i``, ``transformer.ln_f``,
``freqs_cis``; ``lm_head`` tied to ``wte`` when ``tie_embeddings``).

Shapes: B batch, S sequence, H hidden (``n_embd``), V vocabulary, T steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from loopalign.compat import CACHE_FIELD, pick_cache
from loopalign.models.checkpointing import checkpointing_kwargs

# Loop-routed LoRA (loopalign.lora) and Ouro read the one context variable of the current loop; Huginn sets the same.
from loopalign.models.current_loop import current_loop, running_loop

from .configuration_huginn import HuginnConfig

__all__ = [
    "HuginnBlock",
    "HuginnCausalLMOutput",
    "HuginnForCausalLM",
    "HuginnLoopCache",
    "HuginnPreTrainedModel",
    "HuginnRecurrentBlock",
    "HuginnRMSNorm",
    "current_loop",
    "resolve_num_steps",
    "sample_num_steps",
]


class HuginnRMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_table(head_dim: int, theta: float, length: int, device=None) -> torch.Tensor:
    """cos and sin of every (position, pair), float32: [1, length, 1, head_dim/2, 2], the layout of ``freqs_cis``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)[None, :, None]


def apply_rope(x: torch.Tensor, table: torch.Tensor, pairs: str) -> torch.Tensor:
    """x [B,S,heads,D]; table [B or 1,S,1,D/2,2] -> x rotated, same dtype. ``pairs``: "adjacent" rotates (2i, 2i+1)
    in float32 (Huginn); "half" rotates (i, i+D/2) in x's dtype (Llama)."""
    cos, sin = table[..., 0], table[..., 1]
    if pairs == "adjacent":
        xf = x.float().reshape(*x.shape[:-1], -1, 2)
        x0, x1 = xf[..., 0], xf[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)
    cos = torch.cat([cos, cos], dim=-1).to(x.dtype)
    sin = torch.cat([sin, sin], dim=-1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class HuginnAttention(nn.Module):
    """Causal self-attention: fused ``Wqkv`` (rows q|k|v), optional learned ``qk_bias`` added before RoPE, SDPA."""

    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.num_heads = config.n_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_pairs = config.rope_pairs
        self.Wqkv = nn.Linear(config.n_embd, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.bias)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.num_heads, self.head_dim)) if config.qk_bias else None
        self.proj = nn.Linear(self.num_heads * self.head_dim, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        cache_slot: int,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.Wqkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(bsz, seq, nh, hd), k.view(bsz, seq, nkv, hd), v.view(bsz, seq, nkv, hd)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rope(q, rope, self.rope_pairs), apply_rope(k, rope, self.rope_pairs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, cache_slot)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            is_causal=attention_mask is None and seq > 1 and k.shape[2] == seq,
            scale=hd**-0.5,
            enable_gqa=nkv != nh,
        )
        return self.proj(out.transpose(1, 2).reshape(bsz, seq, nh * hd))


class HuginnMLP(nn.Module):
    """Gated MLP: ``fc`` (H -> 2I, rows gate|up), ``proj(silu(gate) * up)``."""

    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class HuginnBlock(GradientCheckpointingLayer):
    """One transformer block, [B,S,H] -> [B,S,H]. ``block_type="sandwich"`` (Huginn):
    ``x = norm_2(x + attn(norm_1(x)))``; ``x = norm_4(x + mlp(norm_3(x)))``. ``"pre_norm"`` (Llama):
    ``x += attn(norm_1(x))``; ``x += mlp(norm_2(x))``.

    ``loop_index`` / ``num_loops`` / ``token_positions`` come as keyword arguments so forward hooks registered
    ``with_kwargs=True`` know the step and the sequence columns; the current loop is set while the block runs.
    """

    def __init__(self, config: HuginnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.sandwich = config.block_type == "sandwich"
        self.attn = HuginnAttention(config)
        self.mlp = HuginnMLP(config)
        self.norm_1 = HuginnRMSNorm(config.n_embd, config.norm_eps)
        self.norm_2 = HuginnRMSNorm(config.n_embd, config.norm_eps)
        if self.sandwich:
            self.norm_3 = HuginnRMSNorm(config.n_embd, config.norm_eps)
            self.norm_4 = HuginnRMSNorm(config.n_embd, config.norm_eps)
        #: name -> make(loop_index, num_loops) -> context manager or None, entered around each call that knows
        #: its loop (loop-routed LoRA installs one here; see loopalign.models.contract.loop_context_layers)
        self.call_contexts: dict[str, Callable[[int, int], AbstractContextManager | None]] = {}

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        rope: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        cache_slot: int = 0,
        loop_index: int | None = None,
        num_loops: int | None = None,
        token_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        where = None if loop_index is None else (loop_index, num_loops if num_loops is not None else loop_index + 1)
        with running_loop(where), ExitStack() as stack:
            if where is not None:
                for make in self.call_contexts.values():
                    context = make(*where)
                    if context is not None:
                        stack.enter_context(context)
            x = hidden_states
            if self.sandwich:
                x = self.norm_2(x + self.attn(self.norm_1(x), rope, attention_mask, cache, cache_slot))
                return self.norm_4(x + self.mlp(self.norm_3(x)))
            x = x + self.attn(self.norm_1(x), rope, attention_mask, cache, cache_slot)
            return x + self.mlp(self.norm_2(x))


class HuginnRecurrentBlock(HuginnBlock):
    """A block of the recurrent core: runs once per step (loopalign's looped layer; ``layer_idx`` is its place
    in the core)."""


class HuginnLoopCache(DynamicCache):
    """Key/value cache with one slot per block call: prelude block p at slot p; at step t, core block r at
    ``P + t*(R+C) + r`` and coda block c (the readout of step t) at ``P + t*(R+C) + R + c``. Slots are created
    on first use, so a call may run any number of steps; step t of a new token attends to step t of earlier ones.
    """

    def __init__(self):
        super().__init__()
        if getattr(self, "layer_class_to_replicate", None) is None:
            self.layer_class_to_replicate = DynamicLayer


@dataclass
class HuginnCausalLMOutput(ModelOutput):
    """Output of :class:`HuginnForCausalLM`.

    loss: next-token cross-entropy of ``logits`` (labels shifted inside, transformers' convention).
    logits: [B,S',V] float32, the last step's readout (``logits_to_keep`` positions).
    loop_hidden_states: T x [B,S,H], each step's readout state (``ln_f`` after the coda: what the LM head reads),
        with ``output_loop_states``; ``exit_probs`` [B,S,T] then puts all mass on the last step.
    loop_logits: T x [B,S',V] float32, the LM head on each step's readout, with ``output_loop_logits``.
    loop_latent_states: T x [B,S,H], the raw latent state after each step (what enters the next), with
        ``output_loop_states``.
    latent_states: [B,S,H], the coda input after the last step (the reference's ``latent_states``).
    layer_hidden_states: T x R x [B,S,H], the residual stream after each core block, with ``output_layer_states``.
    cache: the per-(step, layer) KV cache, with ``use_cache``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None

        @property
        def cache(self) -> Cache | None:
            return self.past_key_values

    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    loop_logits: tuple[torch.Tensor, ...] | None = None
    exit_probs: torch.Tensor | None = None
    loop_latent_states: tuple[torch.Tensor, ...] | None = None
    latent_states: torch.Tensor | None = None
    layer_hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None


def _as_int(value, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def resolve_num_steps(num_loops=None, num_steps=None, default: int = 1) -> tuple[int, int]:
    """(n_no_grad, n_grad) from the contract's ``num_loops`` (an int: every step with gradients) or the reference's
    ``num_steps`` (an int, or a pair (n_no_grad, n_grad) for truncated backprop); ``default`` steps when neither."""
    if num_loops is not None and num_steps is not None:
        if _as_int(num_loops, "num_loops") != sum(resolve_num_steps(num_steps=num_steps)):
            raise ValueError(f"num_loops={num_loops} and num_steps={num_steps!r} disagree: pass one of them")
    value = num_steps if num_steps is not None else num_loops
    name = "num_steps" if num_steps is not None else "num_loops"
    if value is None:
        value, name = default, "config.mean_recurrence"
    if isinstance(value, torch.Tensor) and value.numel() == 2:
        value = tuple(value.tolist())
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} as a pair must be (n_no_grad, n_grad), got {value!r}")
        pair = (_as_int(value[0], f"{name}[0] (n_no_grad)"), _as_int(value[1], f"{name}[1] (n_grad)"))
    else:
        pair = (0, _as_int(value, name))
    if sum(pair) < 1:
        raise ValueError(f"{name} must run at least one step, got {value!r}")
    return pair


def sample_num_steps(config: HuginnConfig, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Huginn's training draw of (n_no_grad, n_grad): with s = mean_backprop_depth and t = mean_recurrence - s,
    rate ~ LogNormal(log(t + s) - 1/8, 0.5), p = Poisson(rate) + 1, n_no_grad = max(p - s, 0), n_grad = min(s, p)."""
    s = config.mean_backprop_depth
    t = max(config.mean_recurrence - s, 0)
    sigma = 0.5
    mu = math.log(t + s) - sigma**2 / 2
    rate = torch.exp(mu + sigma * torch.randn((), generator=generator))
    p = int(torch.poisson(rate.reshape(1), generator=generator).item()) + 1
    return max(p - s, 0), min(s, p)


def build_attention_mask(
    attention_mask: torch.Tensor | None, seq: int, past_len: int, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """Additive mask [B or 1,1,S,past+S] (0 attend, dtype min masked), or None when SDPA's plain causal mode is
    exact: nothing padded and no cached prefix (or one new token). A float mask keeps fully masked rows (left pad
    positions) finite."""
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if not padded and (past_len == 0 or seq == 1):
        return None
    kv_len = past_len + seq
    query = torch.arange(past_len, kv_len, device=device)[:, None]
    key = torch.arange(kv_len, device=device)[None, :]
    allowed = (key <= query)[None, None]
    if padded:
        allowed = allowed & attention_mask.bool()[:, None, None, :kv_len]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


#: options of the reference's generate/forward that this implementation does not have (refused, never ignored)
_REFERENCE_ONLY_OPTIONS = frozenset(
    {
        "criterion",
        "exit_threshold",
        "exit_evaluator",
        "continuous_compute",
        "min_steps",
        "check_criterion_every_n_steps",
        "do_not_exit_in_prefill",
        "draft_steps",
        "headway",
        "lookup_strategy",
        "cache_lookup_strategy",
    }
)


class HuginnPreTrainedModel(PreTrainedModel):
    config_class = HuginnConfig
    config: HuginnConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HuginnBlock", "HuginnRecurrentBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """transformers' activation checkpointing of every block call (each (step, layer) of the core), plus the
        op-level policies of :data:`loopalign.speed.CHECKPOINT_POLICIES` under the key ``policy``."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        policy = kwargs.pop("policy", "full")
        every_n_layers = kwargs.pop("every_n_layers", every_n_layers)
        offload = kwargs.pop("offload", offload)
        super().activation_checkpointing_enable(
            checkpointing_kwargs(policy, kwargs), every_n_layers=every_n_layers, offload=offload
        )

    def _checkpointing_on(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules() if isinstance(m, HuginnBlock))

    def _init_weights(self, module: nn.Module) -> None:
        """Huginn's scaled init: std = sqrt(2 / (5 H)) (or ``init_values["std"]``); output projections
        std / sqrt(2 * effective_expected_depth); norms 1; qk_bias 0; ``freqs_cis`` the RoPE table."""
        config = self.config
        values = config.init_values or {}
        std = values.get("std", math.sqrt(2 / (5 * config.n_embd)))
        out_std = values.get("out_proj", std / math.sqrt(2 * config.effective_expected_depth))
        if isinstance(module, HuginnAttention):
            if module.qk_bias is not None:
                init.zeros_(module.qk_bias)
            init.normal_(module.Wqkv.weight, 0.0, std)
            init.normal_(module.proj.weight, 0.0, out_std)
            for lin in (module.Wqkv, module.proj):
                if lin.bias is not None:
                    init.zeros_(lin.bias)
        elif isinstance(module, HuginnMLP):
            init.normal_(module.fc.weight, 0.0, std)
            init.normal_(module.proj.weight, 0.0, out_std)
            for lin in (module.fc, module.proj):
                if lin.bias is not None:
                    init.zeros_(lin.bias)
        elif isinstance(module, HuginnRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, values.get("embedding", std))
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, HuginnForCausalLM):
            init.copy_(module.freqs_cis, rope_table(config.head_dim, config.rope_base, config.block_size))


class HuginnForCausalLM(HuginnPreTrainedModel, GenerationMixin):
    """Huginn with its LM head. ``forward`` runs ``num_loops`` (or the reference's ``num_steps``) recurrence steps,
    default ``config.mean_recurrence``, from ``input_states`` or a random state of scale ``init_scale`` (default
    ``config.init_scale``; 0 = zero state), and reads out the last step."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: HuginnConfig):
        super().__init__(config)
        H = config.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, H),
                prelude=nn.ModuleList([HuginnBlock(config, i) for i in range(config.n_layers_in_prelude)]),
                adapter=nn.Linear(2 * H, H, bias=config.bias),
                core_block=nn.ModuleList(
                    [HuginnRecurrentBlock(config, i) for i in range(config.n_layers_in_recurrent_block)]
                ),
                coda=nn.ModuleList([HuginnBlock(config, i) for i in range(config.n_layers_in_coda)]),
                ln_f=HuginnRMSNorm(H, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(H, config.padded_vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis", rope_table(config.head_dim, config.rope_base, config.block_size), persistent=True
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _rope_fp32(self) -> torch.Tensor:
        """``freqs_cis`` in float32. A model cast to bf16/fp16 casts the buffer too, which would blur the angles at
        long positions, so the table is then recomputed in float32 (once per device)."""
        if self.freqs_cis.dtype == torch.float32:
            return self.freqs_cis
        cached = getattr(self, "_rope_cache", None)
        if cached is None or cached.device != self.freqs_cis.device:
            c = self.config
            cached = rope_table(c.head_dim, c.rope_base, c.block_size, device=self.freqs_cis.device)
            self._rope_cache = cached
        return cached

    # -- pieces (also the reference's names) -------------------------------------------------------------------
    def initialize_state(self, embedded: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """A random initial latent state like ``embedded`` [B,S,H]: truncated normal (std sqrt(2/(5H)) * scale,
        cut at 3 std) times ``embed_scale``; zeros for ``scale=0``. Draws as the reference does."""
        if scale == 0:
            return torch.zeros_like(embedded)
        x = torch.randn_like(embedded)
        std = math.sqrt(2 / (5 * self.config.n_embd)) * scale
        with torch.no_grad():
            torch.nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return x * self.config.embed_scale

    def _slot(self, step: int, stage: str, index: int) -> int:
        c = self.config
        if stage == "prelude":
            return index
        base = c.n_layers_in_prelude + step * (c.n_layers_in_recurrent_block + c.n_layers_in_coda)
        return base + index if stage == "core" else base + c.n_layers_in_recurrent_block + index

    def _readout(self, state, step, num_loops, ctx) -> torch.Tensor:
        """The readout of one step's raw state [B,S,H]: (ln_f) -> coda -> ln_f, what the LM head reads."""
        x = self.transformer.ln_f(state) if self.config.norm_before_coda else state
        for i, block in enumerate(self.transformer.coda):
            x = block(x, **ctx, cache_slot=self._slot(step, "coda", i), loop_index=step, num_loops=num_loops)
        return self.transformer.ln_f(x)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_loops: int | None = None,
        num_steps: int | tuple[int, int] | None = None,
        input_states: torch.Tensor | None = None,
        init_scale: float | None = None,
        output_loop_states: bool = False,
        output_loop_logits: bool = False,
        output_layer_states: bool = False,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> HuginnCausalLMOutput:
        """input_ids [B,S] (or inputs_embeds [B,S,H], already scaled); attention_mask [B,past+S] (1 token, 0 pad);
        num_loops: steps, all with gradients; num_steps: the reference's int or (n_no_grad, n_grad);
        input_states [B,S,H]: the initial latent state; init_scale: its random scale when not given."""
        config = self.config
        kwargs.pop("output_details", None)  # the reference's switch for which outputs to return: all are returned
        unsupported = sorted(set(kwargs) & _REFERENCE_ONLY_OPTIONS)
        if unsupported:
            raise NotImplementedError(
                f"HuginnForCausalLM: the reference option(s) {unsupported} (adaptive exits, speculative or "
                "diffusion-style decoding, cache lookup strategies) are not implemented; run a fixed num_steps"
            )
        cache = pick_cache(cache, past_key_values, "HuginnForCausalLM.forward")
        n_no_grad, n_grad = resolve_num_steps(num_loops, num_steps, config.mean_recurrence)
        total = n_no_grad + n_grad
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HuginnForCausalLM: pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, sequence], got shape {list(input_ids.shape)}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.padded_vocab_size):
                raise ValueError(
                    f"input_ids holds token ids outside the model's vocabulary [0, {config.padded_vocab_size})"
                )
        bsz, seq = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        use_cache = config.use_cache if use_cache is None else use_cache
        if self._checkpointing_on() and self.training and torch.is_grad_enabled():
            use_cache = False
        if use_cache and cache is None:
            cache = HuginnLoopCache()
        if not use_cache:
            cache = None
        if cache is not None and getattr(cache, "layer_class_to_replicate", None) is None:
            if any(type(layer) is not DynamicLayer for layer in cache.layers):
                raise TypeError(
                    f"Huginn needs a dynamic cache with a slot per (step, layer), got {type(cache).__name__}"
                )
            cache.layer_class_to_replicate = DynamicLayer
        past_len = cache.get_seq_length(0) if cache is not None else 0
        if past_len + seq > config.block_size:
            raise ValueError(
                f"input_ids: a sequence of {past_len + seq} tokens is longer than the model's block_size="
                f"{config.block_size} (its RoPE table)"
            )
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != bsz or attention_mask.shape[1] < past_len + seq:
                raise ValueError(
                    f"attention_mask must be [batch, past+current] = [{bsz}, {past_len + seq}], "
                    f"got {list(attention_mask.shape)}"
                )
            attention_mask = attention_mask[:, : past_len + seq]
        if inputs_embeds is None:
            inputs_embeds = self.transformer.wte(input_ids) * config.embed_scale
        device = inputs_embeds.device
        token_positions = torch.arange(past_len, past_len + seq, device=device)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        table = self._rope_fp32()
        if position_ids is None:
            rope = table[:, past_len : past_len + seq]
        else:
            rope = table[0, position_ids.clamp(max=config.block_size - 1)]  # [B,S,1,D/2,2]
        mask = build_attention_mask(attention_mask, seq, past_len, inputs_embeds.dtype, device)
        ctx = dict(rope=rope, attention_mask=mask, cache=cache, token_positions=token_positions)

        x = inputs_embeds
        for i, block in enumerate(self.transformer.prelude):
            x = block(x, **ctx, cache_slot=self._slot(0, "prelude", i), loop_index=0, num_loops=total)
        embedded = x
        if input_states is not None:
            if input_states.shape != embedded.shape:
                raise ValueError(
                    f"input_states must be [B,S,H] = {list(embedded.shape)}, got {list(input_states.shape)}"
                )
            state = input_states.to(embedded.dtype)
        else:
            scale = config.init_scale if init_scale is None else init_scale
            if scale < 0:
                raise ValueError(f"init_scale must be >= 0, got {scale}")
            state = self.initialize_state(embedded, scale)

        latent: list[torch.Tensor] = []
        layer_states: list[tuple[torch.Tensor, ...]] = []
        for step in range(total):
            grad = contextlib.nullcontext() if step >= n_no_grad else torch.no_grad()
            with grad:
                x = self.transformer.adapter(torch.cat([state, embedded], dim=-1))
                per_layer = []
                for r, block in enumerate(self.transformer.core_block):
                    x = block(x, **ctx, cache_slot=self._slot(step, "core", r), loop_index=step, num_loops=total)
                    if output_layer_states:
                        per_layer.append(x)
                state = x
            if output_loop_states or output_loop_logits:
                latent.append(state)
            if output_layer_states:
                layer_states.append(tuple(per_layer))

        readouts: tuple[torch.Tensor, ...] | None = None
        if output_loop_states or output_loop_logits:  # every step's readout (output_loop_logits alone needs them too)
            readouts = tuple(self._readout(s, t, total, ctx) for t, s in enumerate(latent))
            final = readouts[-1]
        else:
            final = self._readout(state, total - 1, total, ctx)
        latent_states = self.transformer.ln_f(state) if config.norm_before_coda else state

        def keep(h: torch.Tensor) -> torch.Tensor:
            if isinstance(logits_to_keep, int):
                return h[:, -logits_to_keep:] if logits_to_keep > 0 else h
            return h[:, logits_to_keep]

        logits = self.lm_head(keep(final)).float()
        loop_logits = None
        if output_loop_logits:
            loop_logits = tuple(self.lm_head(keep(h)).float() for h in readouts)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=config.padded_vocab_size, **kwargs)
        exit_probs = None
        if output_loop_states:
            exit_probs = torch.zeros(bsz, seq, total, device=device)
            exit_probs[..., -1] = 1.0
        return HuginnCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: cache},
            loop_hidden_states=readouts if output_loop_states else None,
            loop_logits=loop_logits,
            exit_probs=exit_probs,
            loop_latent_states=tuple(latent) if output_loop_states else None,
            latent_states=latent_states,
            layer_hidden_states=tuple(layer_states) if output_layer_states else None,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(CACHE_FIELD) is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    "Huginn supports only its dynamic per-(step, layer) cache, not cache_implementation="
                    f"{generation_config.cache_implementation!r}"
                )
            model_kwargs[CACHE_FIELD] = HuginnLoopCache()
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
