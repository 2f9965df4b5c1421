"""Retrofitted recurrence (McLeish et al. 2025): a pretrained Llama-family causal LM turned into a looped model of
Huginn's shape. Layers ``[0, a)`` become the prelude, ``[a, b)`` the recurrent block (iterated, with the prelude's
output injected every step through a new adapter on ``cat(state, embedding)``), ``[b, L)`` the coda; layers left
out of the three ranges are dropped (the paper's TinyLlama "4-8-4" drops layers 4-9).

The result is a :class:`~loopalign.models.huginn.HuginnForCausalLM` in Llama's block form (pre-norm, rotate-half
RoPE, GQA, no norm between the recurrence and the coda, untied head unless the source ties it), so it answers the
looped-model contract, caches, hooks and loop-routed LoRA like Huginn. Weight mapping: cat(q, k, v) -> ``Wqkv``;
o_proj -> ``attn.proj``; cat(gate, up) -> ``mlp.fc``; down -> ``mlp.proj``; input_layernorm -> ``norm_1``;
post_attention_layernorm -> ``norm_2``; model.norm -> ``ln_f``; embed_tokens -> ``wte``; lm_head -> ``lm_head``.

With no dropped layers, one step and ``adapter_init="embedding"`` (the adapter passes the embedding stream
through and ignores the state), the looped model computes exactly what the source model computes; so does
``adapter_init="sum"`` with a zero initial state, whose later steps, unlike the pass-through's, differ untrained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loopalign.errors import ConfigError

from .huginn import HuginnConfig, HuginnForCausalLM

__all__ = ["RetrofitConfig", "retrofit_recurrence", "ADAPTER_INITS"]

#: how the new adapter Linear(2H -> H) starts: "embedding" = [0 | I] (passes the injected embedding through, so
#: every step computes the same until it is trained), "state" = [I | 0] (passes the state through), "sum" = [I | I]
#: (the state plus the injected embedding: with a zero initial state, init_scale 0, the first step is the source
#: model and each later step runs the recurrent block again on its own output plus the embedding), "random" =
#: normal(0, std)
ADAPTER_INITS = ("embedding", "state", "sum", "random")


@dataclass
class RetrofitConfig:
    """Which source layers form the prelude, the recurrent block and the coda (half-open ranges), and the looped
    model's step counts."""

    prelude: tuple[int, int] = field(metadata={"help": "source layers [start, end) of the prelude (may be empty)"})
    recurrent: tuple[int, int] = field(metadata={"help": "source layers [start, end) of the recurrent block"})
    coda: tuple[int, int] = field(metadata={"help": "source layers [start, end) of the coda (may be empty)"})
    mean_recurrence: int = field(default=4, metadata={"help": "default number of recurrence steps"})
    mean_backprop_depth: int = field(default=2, metadata={"help": "steps with gradients in sampled training"})
    adapter_init: str = field(default="embedding", metadata={"help": f"adapter start, one of {ADAPTER_INITS}"})
    adapter_std: float = field(default=0.02, metadata={"help": "std of adapter_init='random'"})
    init_scale: float = field(default=1.0, metadata={"help": "scale of the random initial state (0: zero state)"})

    def __post_init__(self):
        spans = {}
        for name in ("prelude", "recurrent", "coda"):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
                or not 0 <= value[0] <= value[1]
            ):
                raise ConfigError(
                    f"RetrofitConfig.{name} must be a range (start, end) with 0 <= start <= end, got {value!r}"
                )
            spans[name] = tuple(value)
        if spans["recurrent"][0] == spans["recurrent"][1]:
            raise ConfigError(f"RetrofitConfig.recurrent must hold at least one layer, got {spans['recurrent']}")
        if not spans["prelude"][1] <= spans["recurrent"][0] or not spans["recurrent"][1] <= spans["coda"][0]:
            raise ConfigError(
                f"RetrofitConfig: prelude {spans['prelude']}, recurrent {spans['recurrent']} and coda {spans['coda']} "
                "must be in this order and must not overlap"
            )
        self.prelude, self.recurrent, self.coda = spans["prelude"], spans["recurrent"], spans["coda"]
        if self.mean_recurrence < 1 or self.mean_backprop_depth < 0:
            raise ConfigError(
                f"RetrofitConfig: mean_recurrence must be >= 1 and mean_backprop_depth >= 0, got "
                f"{self.mean_recurrence} / {self.mean_backprop_depth}"
            )
        if self.adapter_init not in ADAPTER_INITS:
            raise ConfigError(f"RetrofitConfig.adapter_init must be one of {ADAPTER_INITS}, got {self.adapter_init!r}")
        if self.init_scale < 0:
            raise ConfigError(f"RetrofitConfig.init_scale must be >= 0, got {self.init_scale}")
        if self.adapter_init == "sum" and self.init_scale != 0:
            raise ConfigError(
                f"RetrofitConfig: adapter_init='sum' adds the initial state to the embedding, so it needs a zero "
                f"initial state (init_scale=0) for its first step to be the source model; got init_scale "
                f"{self.init_scale}"
            )

    def dropped(self, num_layers: int) -> list[int]:
        """Source layer indices in none of the three ranges."""
        kept = {i for a, b in (self.prelude, self.recurrent, self.coda) for i in range(a, b)}
        return [i for i in range(num_layers) if i not in kept]


def _looped_config(source, spec: RetrofitConfig) -> HuginnConfig:
    cfg = source.config
    name = type(source).__name__
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{name}: hidden_act {cfg.hidden_act!r}; retrofitting supports SiLU-gated MLPs")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"{name}: rope_parameters.rope_type {rope_type!r}; retrofitting supports 'default'")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    attn_bias, mlp_bias = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise NotImplementedError(f"{name}: attention_bias={attn_bias} but mlp_bias={mlp_bias}; both or neither")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_prelude = spec.prelude[1] - spec.prelude[0]
    n_core = spec.recurrent[1] - spec.recurrent[0]
    n_coda = spec.coda[1] - spec.coda[0]
    return HuginnConfig(
        n_embd=cfg.hidden_size,
        n_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        n_layers=n_prelude + n_core + n_coda,
        n_layers_in_prelude=n_prelude,
        n_layers_in_recurrent_block=n_core,
        n_layers_in_coda=n_coda,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        padding_multiple=1,
        block_size=cfg.max_position_embeddings,
        rope_base=float(theta),
        norm_eps=cfg.rms_norm_eps,
        qk_bias=False,
        bias=attn_bias,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        mean_recurrence=spec.mean_recurrence,
        mean_backprop_depth=spec.mean_backprop_depth,
        embed_scale=1.0,
        init_scale=spec.init_scale,
        block_type="pre_norm",
        rope_pairs="half",
        norm_before_coda=False,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


def _copy_layer(block, layer, where: str) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    for owner, names in (
        (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (mlp, ("gate_proj", "up_proj", "down_proj")),
    ):
        missing = [n for n in names if not isinstance(getattr(owner, n, None), nn.Linear)]
        if missing:
            raise TypeError(f"{where}: no Llama-style {', '.join(missing)} (retrofitting needs Llama's block layout)")
    with torch.no_grad():
        block.attn.Wqkv.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        block.attn.proj.weight.copy_(attn.o_proj.weight)
        block.mlp.fc.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        block.mlp.proj.weight.copy_(mlp.down_proj.weight)
        if block.attn.Wqkv.bias is not None:
            block.attn.Wqkv.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            block.attn.proj.bias.copy_(attn.o_proj.bias)
            block.mlp.fc.bias.copy_(torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]))
            block.mlp.proj.bias.copy_(mlp.down_proj.bias)
        block.norm_1.weight.copy_(layer.input_layernorm.weight)
        block.norm_2.weight.copy_(layer.post_attention_layernorm.weight)


def retrofit_recurrence(model: nn.Module, spec: RetrofitConfig) -> HuginnForCausalLM:
    """A looped copy of the Llama-family causal LM ``model`` (its weights copied; ``model`` is left as it was):
    prelude / recurrent block / coda from the layer ranges of ``spec``, plus a new adapter Linear(2H -> H)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        raise TypeError(
            f"{type(model).__name__}: retrofit_recurrence needs a Llama-family causal LM (model.model.layers, "
            "embed_tokens, norm)"
        )
    num_layers = len(layers)
    if spec.coda[1] > num_layers or spec.recurrent[1] > num_layers:
        raise ValueError(f"RetrofitConfig: a range ends past the model's {num_layers} layers: {spec}")
    looped = HuginnForCausalLM(_looped_config(model, spec))
    dtype = next(model.parameters()).dtype
    looped.to(dtype)
    stages = (("prelude", spec.prelude), ("core_block", spec.recurrent), ("coda", spec.coda))
    for stage, (start, end) in stages:
        for i, source in enumerate(range(start, end)):
            _copy_layer(looped.transformer[stage][i], layers[source], f"{type(model).__name__} layer {source}")
    with torch.no_grad():
        looped.transformer.wte.weight.copy_(inner.embed_tokens.weight)
        looped.transformer.ln_f.weight.copy_(inner.norm.weight)
        if not looped.config.tie_embeddings:
            looped.lm_head.weight.copy_(model.get_output_embeddings().weight)
        adapter = looped.transformer.adapter
        hidden = looped.config.n_embd
        eye = torch.eye(hidden, dtype=adapter.weight.dtype)
        if spec.adapter_init == "random":
            adapter.weight.normal_(0.0, spec.adapter_std)
        else:
            adapter.weight.zero_()
            if spec.adapter_init in ("embedding", "sum"):
                adapter.weight[:, hidden:] = eye
            if spec.adapter_init in ("state", "sum"):
                adapter.weight[:, :hidden] = eye
        if adapter.bias is not None:
            adapter.bias.zero_()
    looped.config.retrofit = {
        "source": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "prelude": list(spec.prelude),
        "recurrent": list(spec.recurrent),
        "coda": list(spec.coda),
        "dropped": spec.dropped(num_layers),
    }
    return looped.to(next(model.parameters()).device).train(model.training)
