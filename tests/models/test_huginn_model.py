"""Huginn beyond the reference: attention mask, truncated backprop, gradient checkpointing, the per-(step, layer)
cache for any block size, loop-routed LoRA, the looped-model contract and (step, layer) hooks."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loopalign.hooks import add_vector, capture_activations
from loopalign.lora import route_lora_by_loop
from loopalign.models.contract import (
    is_looped,
    loop_forward,
    loop_generate_kwargs,
    looped_layers,
    num_hidden_layers,
    trained_loops,
)
from loopalign.models.huginn import (
    HuginnForCausalLM,
    HuginnLoopCache,
    HuginnRecurrentBlock,
    current_loop,
    resolve_num_steps,
    sample_num_steps,
    tiny_huginn_config,
)


def tiny(**overrides):
    torch.manual_seed(0)
    return HuginnForCausalLM(tiny_huginn_config(**overrides)).eval()


def ids(b=2, s=8, seed=0):
    return torch.randint(3, 512, (b, s), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- attention mask ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_left_padded_rows_equal_their_unpadded_runs():
    model = tiny()
    x = ids(2, 8)
    short = x[1:, 3:]  # row 1: 5 real tokens behind 3 pads
    padded = x.clone()
    padded[1, :3] = 0
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    out = model(padded, attention_mask=mask, num_loops=3, output_loop_states=True, output_loop_logits=True)
    alone = model(short, num_loops=3, output_loop_states=True, output_loop_logits=True)
    full = model(x[:1], num_loops=3)
    torch.testing.assert_close(out.logits[1, 3:], alone.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[0], full.logits[0], atol=1e-5, rtol=0)
    for t in range(3):
        torch.testing.assert_close(out.loop_logits[t][1, 3:], alone.loop_logits[t][0], atol=1e-5, rtol=0)
    # without the mask the padded row differs: the mask is what makes it equal
    unmasked = model(padded, num_loops=3)
    assert not torch.allclose(unmasked.logits[1, 3:], alone.logits[0], atol=1e-3)


@torch.no_grad()
def test_left_padded_cached_generation_equals_unpadded():
    model = tiny()
    x = ids(2, 7)
    padded = x.clone()
    padded[1, :2] = 0
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, num_loops=3)
    both = model.generate(padded, attention_mask=mask, **kwargs)
    alone = model.generate(x[1:, 2:], **kwargs)
    first = model.generate(x[:1], **kwargs)
    assert torch.equal(both[1, 2:], alone[0]) and torch.equal(both[0], first[0])


# -- steps, truncated backprop, checkpointing ----------------------------------------------------------------------


def test_step_arguments_and_their_errors():
    assert resolve_num_steps(num_loops=3) == (0, 3)
    assert resolve_num_steps(num_steps=5) == (0, 5)
    assert resolve_num_steps(num_steps=(2, 3)) == (2, 3)
    assert resolve_num_steps(num_steps=torch.tensor([1, 2])) == (1, 2)
    assert resolve_num_steps(default=4) == (0, 4)
    assert resolve_num_steps(num_loops=5, num_steps=(2, 3)) == (2, 3)
    with pytest.raises(ValueError, match="disagree"):
        resolve_num_steps(num_loops=4, num_steps=(2, 3))
    with pytest.raises(ValueError, match="num_loops must be an int >= 0"):
        resolve_num_steps(num_loops=1.5)
    with pytest.raises(ValueError, match=r"num_steps\[1\] \(n_grad\)"):
        resolve_num_steps(num_steps=(1, -1))
    with pytest.raises(ValueError, match="at least one step"):
        resolve_num_steps(num_steps=(0, 0))
    with pytest.raises(ValueError, match="pair must be"):
        resolve_num_steps(num_steps=(1, 2, 3))
    model = tiny()
    with pytest.raises(ValueError, match="input_states must be"):
        model(ids(), input_states=torch.zeros(2, 3, 64))
    with pytest.raises(ValueError, match="block_size"):
        tiny(block_size=6)(ids(1, 8))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model(torch.tensor([[1, 600]]))
    with pytest.raises(ValueError, match="criterion"):  # adaptive exits: refused, never silently ignored
        model.generate(ids(1, 4), max_new_tokens=2, criterion="entropy-diff", num_steps=4)
    with pytest.raises(NotImplementedError, match="exit_threshold"):
        model(ids(), exit_threshold=1e-3)
    model(ids(), output_details={"return_logits": True})  # the reference's output switch is accepted
    config = tiny_huginn_config(mean_recurrence=32, mean_backprop_depth=8)
    g = torch.Generator().manual_seed(0)
    draws = [sample_num_steps(config, g) for _ in range(200)]
    assert all(k <= 8 and n >= 0 and n + k >= 1 for n, k in draws)
    mean_total = sum(n + k for n, k in draws) / len(draws)
    assert 25 < mean_total < 40  # Poisson(LogNormal with mean 32) + 1


def test_truncated_backprop_flows_through_the_last_steps_only():
    """(n_no_grad=3, n_grad=1) gives the gradients of one step started from the state the 3 no-grad steps reached."""
    model = tiny()
    x = ids()
    out = model(x, num_steps=(3, 1), labels=x)
    ref = model(x, num_loops=4, labels=x)
    torch.testing.assert_close(out.logits, ref.logits)
    out.loss.backward()
    truncated = grads(model)
    model.zero_grad()
    with torch.no_grad():
        state = model(x, num_loops=3, output_loop_states=True).loop_latent_states[-1]
    model(x, num_loops=1, input_states=state, labels=x).loss.backward()
    one_step = grads(model)
    assert truncated.keys() == one_step.keys()
    for name in truncated:
        torch.testing.assert_close(truncated[name], one_step[name], atol=1e-6, rtol=1e-5, msg=name)
    model.zero_grad()
    ref.loss.backward()  # full backprop differs
    full = grads(model)
    assert not torch.allclose(full["transformer.adapter.weight"], truncated["transformer.adapter.weight"])
    model.zero_grad()
    model(x, num_steps=(4, 0), labels=x).loss.backward()  # no step with gradients: the core gets none
    assert all(
        p.grad is None or not p.grad.any()
        for n, p in model.named_parameters()
        if n.startswith(("transformer.core_block", "transformer.adapter"))
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    x = ids()
    model = tiny().train()
    model(x, num_steps=(1, 3), labels=x).loss.backward()
    plain = grads(model)
    model.zero_grad()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert all(b.gradient_checkpointing for b in model.transformer.core_block)
    calls = []  # the attention inside block 0 runs in the checkpointed forward, so it also sees the recompute
    handle = model.transformer.core_block[0].attn.register_forward_pre_hook(lambda m, a: calls.append(current_loop()))
    model(x, num_steps=(1, 3), labels=x).loss.backward()
    handle.remove()
    checkpointed = grads(model)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    # 4 forward calls, then the 3 grad steps recomputed in backward, each at its own loop
    assert calls[:4] == [(t, 4) for t in range(4)] and sorted(calls[4:]) == [(t, 4) for t in (1, 2, 3)]


# -- cache ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_cache_has_a_slot_per_step_and_layer_for_any_block_size():
    model = tiny(n_layers_in_prelude=2, n_layers_in_recurrent_block=3, n_layers_in_coda=2)
    x = ids(1, 6)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    for steps in (1, 5):
        cached = model.generate(x, num_loops=steps, **kwargs)
        seq = x
        for _ in range(6):  # greedy without a cache: the whole prefix each time
            nxt = model(seq, num_loops=steps, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(cached, seq)
    cache = HuginnLoopCache()
    model(x, num_loops=5, cache=cache, use_cache=True)
    assert len(cache.layers) == 2 + 5 * (3 + 2)  # prelude, then (core, coda) per step
    assert cache.get_seq_length(0) == 6
    # a chunk of several tokens over a cached prefix equals the uncached run
    full = model(ids(1, 9), num_loops=2, use_cache=False).logits
    cache = HuginnLoopCache()
    model(ids(1, 9)[:, :5], num_loops=2, cache=cache, use_cache=True)
    rest = model(ids(1, 9)[:, 5:], num_loops=2, cache=cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=0)


# -- contract, hooks, LoRA -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_huginn_answers_the_looped_model_contract():
    model = tiny()
    x = ids()
    assert is_looped(model) and trained_loops(model) == model.config.mean_recurrence == 4
    assert num_hidden_layers(model) == 2
    layers = looped_layers(model)
    assert layers == list(model.transformer.core_block) and all(isinstance(m, HuginnRecurrentBlock) for m in layers)
    out = loop_forward(model, x, torch.ones_like(x), num_loops=3, output_loop_logits=True, logits_to_keep=0)
    direct = model(x, num_loops=3, output_loop_states=True, output_loop_logits=True)
    assert len(out.loop_hidden_states) == 3 and out.exit_probs.shape == (2, 8, 3)
    for t in range(3):
        torch.testing.assert_close(out.loop_logits[t], direct.loop_logits[t])
    torch.testing.assert_close(out.loop_logits[-1], out.logits)
    assert loop_generate_kwargs(model, 2) == {"num_loops": 2}
    peft = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["Wqkv"]))
    assert is_looped(peft) and len(looped_layers(peft)) == 2


@torch.no_grad()
def test_hooks_capture_and_inject_at_step_and_layer():
    model = tiny()
    x = ids()
    base = model(x, num_loops=4, output_layer_states=True, output_loop_states=True)
    with capture_activations(model, [(2, 1), (0, 0)], positions=torch.tensor([1, 6])) as cap:
        model(x, num_loops=4)
    torch.testing.assert_close(cap.get(2, 1), base.layer_hidden_states[2][1][:, [1, 6]])
    torch.testing.assert_close(cap.get(0, 0), base.layer_hidden_states[0][0][:, [1, 6]])
    vec = torch.randn(64)
    with add_vector(model, vec, loop=2, layer=1, strength=2.0, start=5) as record:
        out = model(x, num_loops=4, output_layer_states=True, output_loop_states=True)
    assert record.calls == 1
    torch.testing.assert_close(
        out.layer_hidden_states[2][1][:, 5:] - base.layer_hidden_states[2][1][:, 5:],
        (2.0 * vec).expand(2, 3, -1),
        atol=1e-5,
        rtol=0,
    )
    for t in range(2):  # earlier steps are untouched
        assert torch.equal(out.loop_latent_states[t], base.loop_latent_states[t])
    assert torch.equal(out.logits[:, :5], base.logits[:, :5])  # columns before start (causal)
    assert not torch.allclose(out.logits[:, 5:], base.logits[:, 5:], atol=1e-4)
    with pytest.raises(ValueError, match="never reached"), add_vector(model, vec, loop=3, layer=0):
        model(x, num_loops=2)


@torch.no_grad()
def test_injection_during_cached_generation_covers_generated_tokens():
    model = tiny()
    x = ids(1, 6)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, num_loops=3)
    plain = model.generate(x, **kwargs)
    with add_vector(model, 30 * torch.randn(64), loop=1, layer=0, start=6) as record:
        steered = model.generate(x, **kwargs)
    assert record.calls == 4 and torch.equal(steered[:, :7], plain[:, :7]) and not torch.equal(steered, plain)


def _lora_model():
    model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv", "proj", "fc"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


@torch.no_grad()
def test_lora_on_every_block_routed_to_chosen_steps():
    """Prelude LoRA counts as loop 0, coda LoRA as the step it reads out: routed to loop t, an adapter changes
    loop t and later, never an earlier step's readout."""
    model = _lora_model()
    x = ids()
    with model.disable_adapter():
        base = model(input_ids=x, num_loops=4, output_loop_states=True, output_loop_logits=True)
    everywhere = model(input_ids=x, num_loops=4, output_loop_states=True, output_loop_logits=True)
    assert not torch.allclose(everywhere.loop_logits[0], base.loop_logits[0], atol=1e-3)
    with route_lora_by_loop(model, "last"):
        last = model(input_ids=x, num_loops=4, output_loop_states=True, output_loop_logits=True)
    for t in range(3):  # steps before the last, and their readouts, are the base model's bit for bit
        assert torch.equal(last.loop_logits[t], base.loop_logits[t])
    assert not torch.allclose(last.loop_logits[3], base.loop_logits[3], atol=1e-3)
    with route_lora_by_loop(model, ">=2"):
        late = model(input_ids=x, num_loops=4, output_loop_states=True, output_loop_logits=True)
    assert torch.equal(late.loop_logits[1], base.loop_logits[1])
    assert not torch.allclose(late.loop_logits[2], base.loop_logits[2], atol=1e-3)
    with route_lora_by_loop(model, "0"):
        first = model(input_ids=x, num_loops=4, output_loop_states=True, output_loop_logits=True)
    assert all(not torch.allclose(first.loop_logits[t], base.loop_logits[t], atol=1e-3) for t in range(4))


def test_lora_trains_under_truncated_backprop_and_checkpointing():
    model = _lora_model().train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    x = ids()
    with route_lora_by_loop(model, "last"):
        model(input_ids=x, num_steps=(2, 2), labels=x).loss.backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    core = [g for n, g in trained.items() if "core_block" in n and "lora_A" in n]
    assert core and all(g is not None and g.abs().sum() > 0 for g in core)


def test_save_and_load_round_trip(tmp_path):
    model = tiny(n_layers_in_recurrent_block=3, mean_recurrence=3)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again, HuginnForCausalLM) and again.config.n_layers_in_recurrent_block == 3
    x = ids()
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


@torch.no_grad()
def test_bf16_runs_with_a_float32_rope_table_and_stays_near_float32():
    model = tiny()
    x = ids()
    ref = model(x, num_loops=3).logits
    half = tiny().to(torch.bfloat16)
    assert half.freqs_cis.dtype == torch.bfloat16 and half._rope_fp32().dtype == torch.float32
    torch.testing.assert_close(half._rope_fp32(), model.freqs_cis)
    out = half(x, num_loops=3, output_loop_states=True)
    assert out.logits.dtype == torch.float32 and out.loop_hidden_states[0].dtype == torch.bfloat16
    assert float((out.logits - ref).abs().max()) < 0.1
    assert half.generate(ids(1, 5), max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 8)


def test_output_loop_logits_works_on_its_own():
    """[architecture-2] item 7: the per-step logits without asking for the per-step states too (as on Ouro)."""
    model = tiny()
    x = torch.randint(0, 64, (2, 5))
    alone = model(x, num_loops=3, output_loop_logits=True)
    both = model(x, num_loops=3, output_loop_states=True, output_loop_logits=True)
    assert len(alone.loop_logits) == 3 and alone.loop_hidden_states is None
    for a, b in zip(alone.loop_logits, both.loop_logits):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(alone.logits, both.logits)
