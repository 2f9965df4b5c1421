"""Loop-aware LoRA routing."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loopalign.lora import parse_loop_selection, route_lora_by_loop, skip_lora_input_upcast

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(tiny_model_factory):
    model = tiny_model_factory()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    for n, p in peft_model.named_parameters():  # make adapters non-trivial (lora_B starts at zero)
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return peft_model


def _ids():
    return torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec,active", [("last", {3}), (">=2", {2, 3}), ("1,3", {1, 3}), ([0], {0})])
def test_inactive_loops_equal_the_base_model_exactly(tiny_model_factory, spec, active):
    model = _peft(tiny_model_factory)
    x = _ids()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=x, output_loop_states=True).loop_hidden_states
        full = model(input_ids=x, output_loop_states=True).loop_hidden_states
        with route_lora_by_loop(model, spec):
            routed = model(input_ids=x, output_loop_states=True).loop_hidden_states
    first_active = min(active)
    for t in range(4):
        if t < first_active:
            assert torch.equal(routed[t], base[t]), t  # bit-exact
        if t == first_active:
            assert not torch.allclose(routed[t], base[t])
    if active == {0, 1, 2, 3}:
        assert torch.equal(routed[3], full[3])
    # routing removed on exit: plain adapters again
    with torch.no_grad():
        again = model(input_ids=x, output_loop_states=True).loop_hidden_states
    assert torch.equal(again[0], full[0])


def test_routing_is_correct_under_gradient_checkpointing(tiny_model_factory):
    x = _ids()
    grads = []
    for checkpointing in (False, True):
        model = _peft(tiny_model_factory).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        route_lora_by_loop(model, "last")
        model(input_ids=x, labels=x, exit="expected").loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_routing_applies_during_generation(tiny_model_factory):
    model = _peft(tiny_model_factory)
    x = _ids()[:1]
    with torch.no_grad():
        with model.disable_adapter():
            base = model.generate(input_ids=x, max_new_tokens=5, do_sample=False, num_loops=2)
        with route_lora_by_loop(model, ">=2"):  # a 2-loop call never reaches loop 2
            routed = model.generate(input_ids=x, max_new_tokens=5, do_sample=False, num_loops=2)
    assert torch.equal(base, routed)


def test_bad_specs_and_models(tiny_model_factory):
    with pytest.raises(ValueError, match="not understood"):
        parse_loop_selection("first")
    with pytest.raises(ValueError, match="names loop 4, but the model runs 4 loops"):
        parse_loop_selection(">=4", max_loops=4)
    with pytest.raises(ValueError, match="non-negative"):
        parse_loop_selection([-1])
    with pytest.raises(ValueError, match="no PEFT LoRA modules"):
        route_lora_by_loop(tiny_model_factory(), "last")


def test_removed_routing_lets_adapters_merge_again(tiny_model_factory):
    from loopalign.lora import merged_lora

    model = _peft(tiny_model_factory)
    with route_lora_by_loop(model, "last"):
        with merged_lora(model) as merged:
            assert not merged  # routed adapters cannot be folded into the weights
    with merged_lora(model, strict=True) as merged:
        assert merged
    decoder_layers = model.base_model.model.model.layers
    assert all(not layer.call_contexts for layer in decoder_layers)


def test_skipped_loops_skip_the_adapter_matmuls(tiny_model_factory):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    model = _peft(tiny_model_factory)
    counts = {}
    for spec in ("all", "last"):
        with route_lora_by_loop(model, spec), torch.no_grad(), CountMatmuls() as mode:
            model(input_ids=_ids(), use_cache=False, logits_to_keep=1)
        counts[spec] = mode.count
    # 7 adapted projections x 2 matmuls (A, B) x 2 layers x 3 skipped loops
    assert counts["all"] - counts["last"] == 7 * 2 * 2 * 3


def test_a_plain_causal_lm_routes_all_only_and_skips_no_upcast():
    """A non-looped model has no loop-aware layers: routing to some loops is refused by name, 'all' and the
    upcast skip are no-ops, and its adapters still act."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="LlamaForCausalLM is not a looped model.*'all'"):
        route_lora_by_loop(model, "last")
    with route_lora_by_loop(model, "all"):
        pass
    assert skip_lora_input_upcast(model) == 0


def test_lora_loops_take_the_loop_set_grammar_of_every_other_option():
    """--lora_loops 2-3 means what --injection_loops 2-3 means (one grammar for loop sets: ranges and lists)."""
    from loopalign.loops import parse_loop_indices

    for spec in ("2-3", "0,2-3", "1", "0-1,3"):
        assert parse_loop_selection(spec, max_loops=4).loops == frozenset(parse_loop_indices(spec, "--injection_loops"))
    with pytest.raises(ValueError, match="loop spec must be 0-based loop indices"):
        parse_loop_selection("3-1")
