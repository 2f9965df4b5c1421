"""Compiled decoder layers: changing lengths reuse the graph, loop routing and ``disable_adapter``
hold in compiled code, a whole gap-SFT-like run stays within torch's default recompile budget, and
the LoRA input-upcast skip is bit-identical under autocast.

The compiled layers use the ``aot_eager`` backend: it runs dynamo's tracing, guards and
AOTAutograd like ``inductor`` but skips code generation (minutes of C++ compilation on this CPU).
"""

import pytest
import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from loopalign import OuroForCausalLM, tiny_config
from loopalign.lora import merged_lora, route_lora_by_loop, skip_lora_input_upcast
from loopalign.speed import compile_decoder_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(
        OuroForCausalLM(tiny_config()), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an effect
            torch.nn.init.normal_(p, std=0.1)
    return model


def _ids(b, s, seed):
    return torch.randint(3, 512, (b, s), generator=torch.Generator().manual_seed(seed))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    """A clean dynamo cache and counters, and torch's *default* recompile budget (8), with hitting it
    an error instead of the silent fall-back to uncompiled layers."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _step(model, x):
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same_step(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_changing_lengths_reuse_one_graph_without_breaks(fresh_dynamo):
    """B2: the attention's ``is_causal`` read the sequence length; traced with a symbolic length it
    was a SymBool, every layer graph-broke and recompiled until the budget ran out."""
    eager, compiled = _model().train(), _model().train()
    assert compile_decoder_layers(compiled, backend="aot_eager", recompile_limit=None) == 2
    for i, (b, s) in enumerate([(2, 8), (2, 13), (3, 9), (2, 17), (1, 6)]):
        x = _ids(b, s, seed=i)
        _assert_same_step(_step(eager, x), _step(compiled, x))
        if i == 3:
            # one graph for the first layer call (its input, the frozen embedding, needs no grad)
            # and one for the 7 others, whatever the batch size and length
            assert _graphs() == 2, dict(counters["stats"])
    # a batch of 1 makes the pair again (torch specialises size-1 dims)
    assert _graphs() == 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_routed_compiled_layers_equal_routed_eager(fresh_dynamo, when):
    """B4: routing used to be a hook that read a context variable (a graph break per LoRA-B call)
    and, installed after compiling, was ignored by the compiled code (wrong outputs, silently)."""
    eager, compiled = _model().train(), _model().train()
    route_lora_by_loop(eager, "last")
    if when == "before":
        route_lora_by_loop(compiled, "last")
    compile_decoder_layers(compiled, backend="aot_eager", recompile_limit=None)
    if when == "after":
        compiled(input_ids=_ids(2, 8, 0), use_cache=False)  # compiled, with every loop's adapters on
        route_lora_by_loop(compiled, "last")
    x = _ids(2, 10, seed=1)
    _assert_same_step(_step(eager, x), _step(compiled, x))
    with torch.no_grad():
        a = eager(input_ids=x, use_cache=False, output_loop_states=True).loop_hidden_states
        b = compiled(input_ids=x, use_cache=False, output_loop_states=True).loop_hidden_states
        with compiled.disable_adapter():
            base = compiled(input_ids=x, use_cache=False, output_loop_states=True).loop_hidden_states
    for t in range(4):
        torch.testing.assert_close(a[t], b[t], atol=1e-6, rtol=0)
    for t in range(3):  # loops the adapters skip equal the base model's bit for bit
        assert torch.equal(b[t], base[t]), t
    assert not torch.allclose(b[3], base[3])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_a_gap_sft_run_stays_within_the_default_recompile_budget(fresh_dynamo):
    """Training at changing lengths with routed adapters, the ``rr_distill`` base pass (adapters
    off, no grad), evaluation with and without a mask, and merged-LoRA evaluation: every compiled
    call equals eager, and all variants fit torch's default budget of 8 (an error otherwise)."""
    eager, compiled = _model().train(), _model().train()
    for model in (eager, compiled):
        route_lora_by_loop(model, ">=2")
    compile_decoder_layers(compiled, backend="aot_eager", recompile_limit=None)

    def both(fn):
        return fn(eager), fn(compiled)

    def base_pass(model, x):
        with torch.no_grad(), model.disable_adapter():
            return model(input_ids=x, use_cache=False, output_loop_states=True).loop_hidden_states[-1]

    for i, s in enumerate([9, 14, 11]):
        x = _ids(2, s, seed=i)
        _assert_same_step(*both(lambda m, x=x: _step(m, x)))
        a, b = both(lambda m, x=x: base_pass(m, x))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: a mask tensor reaches the layers
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            a, b = both(lambda m, kw=kwargs: m(input_ids=_ids(2, 12, 7), use_cache=False, **kw).logits)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        for model in (eager, compiled):
            model._loopalign_lora_routing.remove()
        with merged_lora(eager, strict=True), merged_lora(compiled, strict=True):
            a, b = both(lambda m: m(input_ids=_ids(2, 10, 8), use_cache=False).logits)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert _graphs() <= 8, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_raises_the_recompile_limit_only_upwards():
    with torch._dynamo.config.patch(recompile_limit=8):
        compile_decoder_layers(_model(), backend="aot_eager")
        assert torch._dynamo.config.recompile_limit == 16
        compile_decoder_layers(_model(), backend="aot_eager", recompile_limit=4)
        assert torch._dynamo.config.recompile_limit == 16


class _CountUpcasts(TorchDispatchMode):
    """Counts bfloat16 -> float32 casts."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16:
            self.count += kwargs.get("dtype") == torch.float32
        return func(*args, **kwargs)


def _bf16_autocast_step(skip: bool):
    torch.manual_seed(0)
    base = OuroForCausalLM(tiny_config()).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    if skip:
        assert skip_lora_input_upcast(model) == 2 * len(TARGETS)
    x = _ids(2, 10, seed=3)
    upcasts = _CountUpcasts()
    with upcasts, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x, use_cache=False, output_loop_states=True)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, upcasts.count, model


def test_skipping_peft_input_upcast_under_autocast_is_bit_identical():
    plain, plain_grads, plain_upcasts, _ = _bf16_autocast_step(skip=False)
    fast, fast_grads, fast_upcasts, model = _bf16_autocast_step(skip=True)
    assert torch.equal(plain.loss, fast.loss)
    for a, b in zip(plain.loop_hidden_states, fast.loop_hidden_states):
        assert torch.equal(a, b)
    assert plain_grads.keys() == fast_grads.keys()
    for name in plain_grads:
        assert torch.equal(plain_grads[name], fast_grads[name]), name
    # PEFT's cast of each adapter input to float32: 7 projections x 2 layers x 4 loops of them gone
    assert plain_upcasts - fast_upcasts == 7 * 2 * 4
    # outside autocast PEFT still casts (bf16 activations, float32 adapters): no dtype error
    with torch.no_grad():
        out = model(input_ids=_ids(1, 5, seed=4), use_cache=False)
    assert out.logits.dtype == torch.bfloat16
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_upcast_skip_leaves_lora_with_dropout_alone():
    model = get_peft_model(OuroForCausalLM(tiny_config()), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    assert skip_lora_input_upcast(model) == 0


def test_feature_extraction_with_compiled_layers_equals_plain(fresh_dynamo):
    from loopalign.eval.api import GapConfig
    from loopalign.eval.features import EvalRecord, FeatureConfig, extract_features

    model = _model().eval()
    g = torch.Generator().manual_seed(5)
    records = []
    for i, s in enumerate([7, 12, 9, 15, 6]):  # lengths differ within and between batches
        ids = torch.randint(3, 512, (s,), generator=g).tolist()
        records.append(EvalRecord(f"r{i}", ids, s - 1, [s - 2, s - 1], i % 2, f"g{i}"))
    out = {}
    for compiled in (False, True):
        config = FeatureConfig(batch_size=2, compile_layers=compiled, compile_backend="aot_eager")
        out[compiled] = extract_features(model, records, loops=[2, 4], verdict_ids=(5, 6), config=config)
    torch.testing.assert_close(out[True].states, out[False].states, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True].verdict_logp, out[False].verdict_logp, atol=1e-5, rtol=0)
    assert _graphs() >= 1 and not counters["graph_break"]
    # the layers are plain again afterwards
    assert all(layer.compiled_compute is None for layer in model.base_model.model.model.layers)
    assert GapConfig(compile_layers=True).features.compile_layers
    with pytest.raises(ValueError, match="compile_backend"):
        FeatureConfig(compile_backend="")
