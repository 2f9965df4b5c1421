"""Ouro LoopLM, written for loopalign: every loop's state is exposed and can be trained.

Architecture (facts in ``docs/ouro.md``): token embeddings, then ``num_loops`` passes through the
same ``num_hidden_layers`` sandwich-norm decoder layers; after each pass the final RMSNorm is
applied, the normed state is recorded as that loop's state and fed to the next pass, and an exit
gate ``Linear(H, 1)`` gives a logit per token. One ``lm_head`` reads any loop's state.

State-dict keys equal the released checkpoints', so ``ByteDance/Ouro-1.4B`` loads as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from loopalign.compat import CACHE_FIELD, pick_cache
from loopalign.loops import (
    OuroCausalLMOutput,
    OuroModelOutput,
    exit_distribution,
    resolve_exit,
    threshold_exit_index,
)

from ..checkpointing import checkpointing_kwargs
from ..current_loop import _CURRENT_LOOP, current_loop
from .configuration_ouro import OuroConfig

__all__ = [
    "OuroPreTrainedModel",
    "OuroModel",
    "OuroForCausalLM",
    "OuroDecoderLayer",
    "OuroRMSNorm",
    "OuroLoopCache",
    "current_loop",
]


class OuroRMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary tables, computed in float32. position_ids [B,S] -> cos, sin [B,S,head_dim]."""
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    with torch.autocast(device_type=device.type, enabled=False):
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,heads,S,D]; cos/sin [B,S,D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class OuroMLP(nn.Module):
    def __init__(self, config: OuroConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OuroAttention(nn.Module):
    """Causal self-attention with rotary embeddings; one KV-cache slot per (loop, layer)."""

    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        cache_slot: int,
    ) -> torch.Tensor:
        bsz, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, cache_slot)
        # attention_dropout first: with none (the released config) the train/eval flag is never read,
        # so a compiled layer does not need one graph for training and one for evaluation
        dropout = self.attention_dropout if self.attention_dropout and self.training else 0.0
        if self.config._attn_implementation == "eager":
            out = self._eager(q, k, v, attention_mask, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask,
                dropout_p=dropout,
                # No mask object at all when nothing is padded and there is no cached prefix. Without a
                # cache the condition reads no shape, so it stays a plain bool when torch.compile
                # traces with dynamic sequence lengths (a shape test would be a SymBool: graph break).
                is_causal=attention_mask is None and (cache is None or k.shape[2] == seq),
                scale=self.scaling,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _eager(self, q, k, v, attention_mask, dropout):
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        seq, kv = q.shape[2], k.shape[2]
        if attention_mask is None and seq > 1:
            causal = torch.ones(seq, kv, dtype=torch.bool, device=q.device).tril(kv - seq)
            attention_mask = torch.zeros(seq, kv, dtype=scores.dtype, device=q.device)
            attention_mask.masked_fill_(~causal, torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout:
            weights = F.dropout(weights, p=dropout, training=True)
        return torch.matmul(weights, v)


class OuroDecoderLayer(GradientCheckpointingLayer):
    """Sandwich-norm decoder layer:
    ``x += norm_2(attn(norm(x)))``; ``x += post_norm_2(mlp(post_norm(x)))``.

    ``loop_index`` and ``token_positions`` are passed as keyword arguments so that forward hooks
    registered ``with_kwargs=True`` know which loop and which sequence columns they see.
    """

    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_layers = config.num_hidden_layers
        self.self_attn = OuroAttention(config, layer_idx)
        self.mlp = OuroMLP(config)
        self.input_layernorm = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm_2 = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_2 = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        #: a ``torch.compile``-d ``compute``, used for calls without a KV cache (training, scoring);
        #: set by :func:`loopalign.speed.compile_decoder_layers`
        self.compiled_compute = None
        #: per-call contexts by name: ``fn(loop_index, num_loops)`` -> a context manager entered around
        #: ``compute`` (or None to skip). Module state they set (e.g. :func:`loopalign.lora.route_lora_by_loop`
        #: switching a loop's adapters off) is guarded by ``torch.compile``, so compiled code follows it.
        self.call_contexts: dict[str, Callable[[int, int], AbstractContextManager | None]] = {}

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        loop_index: int = 0,
        num_loops: int | None = None,
        token_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_loops = num_loops if num_loops is not None else loop_index + 1
        token = _CURRENT_LOOP.set((loop_index, num_loops))
        try:
            cache_slot = loop_index * self.num_layers + self.layer_idx
            compute = self.compute
            if self.compiled_compute is not None and cache is None:
                compute = self.compiled_compute
            if not self.call_contexts:
                return compute(hidden_states, position_embeddings, attention_mask, cache, cache_slot)
            with ExitStack() as stack:
                for make in self.call_contexts.values():
                    context = make(loop_index, num_loops)
                    if context is not None:
                        stack.enter_context(context)
                return compute(hidden_states, position_embeddings, attention_mask, cache, cache_slot)
        finally:
            _CURRENT_LOOP.reset(token)

    def compute(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        cache_slot: int,
    ) -> torch.Tensor:
        """The layer's arithmetic, [B,S,H] -> [B,S,H]. Kept apart from ``forward`` (which sets the
        current loop) so that :func:`loopalign.speed.compile_decoder_layers` can compile it whole; calls
        that carry a KV cache (generation) run it uncompiled."""
        attn = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, cache_slot
        )
        hidden_states = hidden_states + self.input_layernorm_2(attn)
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.post_attention_layernorm_2(mlp)


class OuroLoopCache(DynamicCache):
    """Key/value cache with one slot per (loop, layer): slot ``loop * num_layers + layer``.

    Slots are created on first use, so a call may run more loops than the model was trained with.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers


class OuroPreTrainedModel(PreTrainedModel):
    config_class = OuroConfig
    config: OuroConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OuroDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """transformers' activation checkpointing, plus op-level selective checkpointing: the key
        ``policy`` of ``activation_checkpointing_kwargs`` names what a checkpointed layer keeps
        (:data:`loopalign.models.checkpointing.CHECKPOINT_POLICIES`: ``full``, ``save_attention``,
        ``save_matmuls``). ``every_n_layers`` and ``offload`` may also come in that dict (as from
        ``TrainingArguments.activation_checkpointing_kwargs``)."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        policy = kwargs.pop("policy", "full")
        every_n_layers = kwargs.pop("every_n_layers", every_n_layers)
        offload = kwargs.pop("offload", offload)
        super().activation_checkpointing_enable(
            checkpointing_kwargs(policy, kwargs), every_n_layers=every_n_layers, offload=offload
        )


def _check_num_loops(num_loops) -> int:
    if isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1:
        raise ValueError(
            f"num_loops must be a positive integer (number of passes through the layers), got {num_loops!r}"
        )
    return num_loops


class OuroModel(OuroPreTrainedModel):
    """The looped decoder: embeddings, shared layers run ``num_loops`` times, final norm, exit gate."""

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([OuroDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = OuroRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        output_loop_states: bool = True,
        output_layer_states: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> OuroModelOutput:
        """Run ``num_loops`` passes (default ``config.total_ut_steps``).

        Returns ``last_hidden_state`` [B,S,H] (the normed state after the last loop),
        ``loop_hidden_states`` (T x [B,S,H]) when ``output_loop_states``, ``gate_logits``
        (T x [B,S]) always, and ``layer_hidden_states`` (T x L x [B,S,H]) when
        ``output_layer_states``, and ``cache`` (the per-(loop, layer) KV cache) with ``use_cache``.
        The cache may be passed as ``cache`` or, as before transformers 5.24, ``past_key_values``.

        Raises ``ValueError`` for a sequence longer than ``config.max_position_embeddings`` (cached
        tokens included), token ids outside ``[0, vocab_size)`` and an ``attention_mask`` holding
        values other than 0 and 1 (the value checks are skipped while ``torch.compile`` traces).
        """
        cache = pick_cache(cache, past_key_values, "OuroModel.forward")
        num_loops = _check_num_loops(self.config.total_ut_steps if num_loops is None else num_loops)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("OuroModel: pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {list(input_ids.shape)}")
        bsz, seq = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = OuroLoopCache(self.config.num_hidden_layers)
        if not use_cache:
            cache = None
        past_len = cache.get_seq_length(0) if cache is not None else 0
        if cache is not None and not isinstance(cache, OuroLoopCache):
            _ensure_lazy_slots(cache)

        limit = self.config.max_position_embeddings
        if past_len + seq > limit:
            raise ValueError(
                f"input_ids: {seq} tokens"
                + (f" after {past_len} cached ones" if past_len else "")
                + f" make a sequence of {past_len + seq}, longer than the model's max_position_embeddings={limit}"
            )
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != bsz or attention_mask.shape[1] < past_len + seq:
                raise ValueError(
                    f"attention_mask must be [batch, past+current] = [{bsz}, {past_len + seq}], "
                    f"got {list(attention_mask.shape)}"
                )
            attention_mask = attention_mask[:, : past_len + seq]
        mask_facts = _check_input_values(
            input_ids, attention_mask, self.config.vocab_size, check=not torch.compiler.is_compiling()
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        device = inputs_embeds.device
        token_positions = torch.arange(past_len, past_len + seq, device=device)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = token_positions.unsqueeze(0).expand(bsz, -1)
        cos, sin = rotary_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_parameters["rope_theta"], inputs_embeds.dtype
        )
        mask = build_attention_mask(attention_mask, seq, past_len, inputs_embeds.dtype, device, facts=mask_facts)

        loop_states: list[torch.Tensor] = []
        gate_logits: list[torch.Tensor] = []
        layer_states: list[tuple[torch.Tensor, ...]] = []
        hidden = inputs_embeds
        for loop_index in range(num_loops):
            per_layer = []
            for layer in self.layers:
                hidden = layer(
                    hidden,
                    position_embeddings=(cos, sin),
                    attention_mask=mask,
                    cache=cache,
                    loop_index=loop_index,
                    num_loops=num_loops,
                    token_positions=token_positions,
                )
                if output_layer_states:
                    per_layer.append(hidden)
            hidden = self.norm(hidden)
            if output_loop_states or loop_index == num_loops - 1:
                loop_states.append(hidden)
            gate_logits.append(self.early_exit_gate(hidden).squeeze(-1))
            if output_layer_states:
                layer_states.append(tuple(per_layer))
        return OuroModelOutput(
            last_hidden_state=hidden,
            loop_hidden_states=tuple(loop_states) if output_loop_states else None,
            gate_logits=tuple(gate_logits),
            layer_hidden_states=tuple(layer_states) if output_layer_states else None,
            **{CACHE_FIELD: cache},
        )


def _check_input_values(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, vocab_size: int, check: bool = True
) -> tuple[bool, bool] | None:
    """Validate token ids (in ``[0, vocab_size)``) and mask values (0 or 1) with ``check``, and read the
    mask's facts for :func:`build_attention_mask`, all in one host sync (one min/max for the ids).
    -> (anything padded, padding only at row ends) when there is a mask, else None."""
    stats: list[torch.Tensor] = []
    check_ids = check and input_ids is not None and input_ids.numel() > 0
    if check_ids:
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        lo, hi = torch.aminmax(input_ids)
        stats += [lo.long(), hi.long()]
    check_mask = check and attention_mask is not None and attention_mask.dtype != torch.bool
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)
        # anything padded, and is every row's padding at its end
        stats += [(~keep.all()).long(), (keep[:, 1:] <= keep[:, :-1]).all().long()]
        if check_mask:
            binary = (attention_mask == 0) | (attention_mask == 1)
            stats.append(binary.all().long())
    if not stats:
        return None
    device = stats[0].device
    values = torch.stack([x.to(device) for x in stats]).tolist()  # the one host sync
    if check_ids:
        lo, hi, values = values[0], values[1], values[2:]
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids holds the token id {bad}, outside the model's vocabulary [0, {vocab_size}) "
                f"(vocab_size={vocab_size}): was it tokenised for another model?"
            )
    if attention_mask is None:
        return None
    if check_mask and not values[2]:
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)].flatten()[:3].tolist()
        raise ValueError(
            f"attention_mask must hold only 0 (padding) and 1 (token), got values such as {odd} "
            f"(dtype {attention_mask.dtype})"
        )
    return bool(values[0]), bool(values[1])


def _ensure_lazy_slots(cache: Cache) -> None:
    """Let a cache made elsewhere (e.g. ``DynamicCache(config=...)``) grow a slot per (loop, layer)."""
    if getattr(cache, "layer_class_to_replicate", None) is None:
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise TypeError(
                f"Ouro needs a dynamic cache with one slot per (loop, layer); got {type(cache).__name__} "
                f"with layers {sorted({type(layer).__name__ for layer in cache.layers})}"
            )
        cache.layer_class_to_replicate = DynamicLayer


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    seq: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    facts: tuple[bool, bool] | None = None,
) -> torch.Tensor | None:
    """Additive mask [B or 1,1,S,past+S] (0 = attend, dtype's min = masked), or None when plain
    causal attention suffices: nothing padded and no cached prefix (or a single new token), or
    only right padding and no cached prefix (outputs at the padded positions are then unspecified).

    A float mask, not a boolean one, so a fully masked query (a left-pad position) gets uniform
    attention over all keys as in transformers' eager path: its outputs stay finite and equal
    the reference's, which matters because the first real token's label is read from it.

    ``facts``: (anything padded, padding only at row ends) when the caller has read them already
    (:func:`_check_input_values`), saving a host sync.
    """
    kv_len = past_len + seq
    padded = right_padded = False
    if attention_mask is not None and facts is not None:
        padded, right_padded = facts
    elif attention_mask is not None:
        keep = attention_mask.to(torch.bool)
        # one host sync for both facts: anything padded, and is every row's padding at its end
        padded, right_padded = torch.stack([~keep.all(), (keep[:, 1:] <= keep[:, :-1]).all()]).tolist()
    if not padded and (past_len == 0 or seq == 1):
        return None
    if padded and right_padded and past_len == 0:
        # Right padding with no cached prefix: under plain causal attention a real token sees only
        # earlier positions, all of them real, so its output is exact without any mask and the
        # flash kernel can run. Only the padded positions' outputs (never read) differ.
        return None
    query_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # [S,1]
    key_pos = torch.arange(kv_len, device=device)[None, :]  # [1,K]
    allowed = (key_pos <= query_pos)[None, None]  # [1,1,S,K]
    if padded:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class OuroForCausalLM(OuroPreTrainedModel, GenerationMixin):
    """Ouro with its language-model head. ``forward`` chooses the readout with ``exit``:

    - ``"last"``: the last loop's state;
    - an ``int`` t: loop t's state (0-based: ``0 <= t < num_loops``; negative indices are refused);
    - ``"threshold"``: per token, the first loop whose cumulative exit probability reaches
      ``exit_threshold`` (default ``config.early_exit_threshold``; the last loop if none does);
    - ``"expected"``: the exit-probability-weighted mixture of the loops' logits.

    ``None`` means ``config.exit_mode`` (default ``"threshold"``, which with the released
    threshold 1.0 is the last loop). With ``labels``, ``loss`` is the next-token cross-entropy of
    the returned ``logits`` (so ``exit="expected"`` gives the reference's mixture loss). Per-loop
    objectives live in :mod:`loopalign.objectives`; per-loop logits at chosen positions come
    from :func:`loopalign.loops.loop_logits`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.model = OuroModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

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
        exit: str | int | None = None,
        exit_threshold: float | None = None,
        output_loop_states: bool = False,
        output_layer_states: bool = False,
        output_loop_logits: bool = False,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> OuroCausalLMOutput:
        cache = pick_cache(cache, past_key_values, "OuroForCausalLM.forward")
        num_loops = _check_num_loops(self.config.total_ut_steps if num_loops is None else num_loops)
        mode, fixed_loop = resolve_exit(self.config.exit_mode if exit is None else exit, num_loops)
        q = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        if mode == "threshold" and not 0.0 < q <= 1.0:
            raise ValueError(f"exit_threshold must be in (0, 1], got {q}")
        need_all_states = output_loop_states or output_loop_logits or mode != "last"
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_loops=num_loops,
            output_loop_states=need_all_states,
            output_layer_states=output_layer_states,
        )
        gate_logits = out.gate_logits
        exit_probs = exit_distribution(torch.stack(gate_logits, dim=-1))  # [B,S,T]
        exit_loop = None
        if mode == "last":
            state = out.last_hidden_state
        elif mode == "fixed":
            state = out.loop_hidden_states[fixed_loop]
        elif mode == "threshold":
            exit_loop = threshold_exit_index(exit_probs, q)  # [B,S]
            stacked = torch.stack(out.loop_hidden_states, dim=0)  # [T,B,S,H]
            index = exit_loop[None, :, :, None].expand(1, -1, -1, stacked.shape[-1])
            state = stacked.gather(0, index).squeeze(0)
        else:  # expected: lm_head is linear and bias-free, so the mixture of logits is lm_head(mixture)
            stacked = torch.stack(out.loop_hidden_states, dim=-1)  # [B,S,H,T]
            state = (stacked * exit_probs.to(stacked.dtype)[:, :, None, :]).sum(-1)
        if isinstance(logits_to_keep, int):
            state = state[:, -logits_to_keep:, :] if logits_to_keep > 0 else state
        else:
            state = state[:, logits_to_keep, :]
        logits = self.lm_head(state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return OuroCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: out.cache},
            loop_hidden_states=out.loop_hidden_states if output_loop_states else None,
            gate_logits=gate_logits if output_loop_states else None,
            exit_probs=exit_probs if output_loop_states else None,
            exit_loop=exit_loop,
            layer_hidden_states=out.layer_hidden_states,
            # every position of every loop: T x [B,S,V] (T x S x V floats per row; ask only when needed)
            loop_logits=tuple(self.lm_head(h) for h in out.loop_hidden_states) if output_loop_logits else None,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(CACHE_FIELD) is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"Ouro supports only a dynamic per-loop cache, not cache_implementation="
                    f"{generation_config.cache_implementation!r}"
                )
            model_kwargs[CACHE_FIELD] = OuroLoopCache(self.config.num_hidden_layers)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
