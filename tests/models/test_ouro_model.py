"""Behaviour of the native Ouro: loop counts, caching, padding, saving, training paths, errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from loopalign import OuroForCausalLM, tiny_config
from loopalign.loops import exit_distribution, loop_logits, threshold_exit_index


def _ids(b=2, s=10, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, s), generator=g)


def test_save_load_round_trip(tmp_path, tiny_model_factory):
    model = tiny_model_factory()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, OuroForCausalLM)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits, atol=0, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("num_loops", [1, 2, 4, 7])
def test_per_call_loop_counts_are_prefixes(tiny_model_factory, num_loops):
    """Running k loops equals the first k loops of a longer run (loops are sequential)."""
    model = tiny_model_factory()
    x = _ids()
    with torch.no_grad():
        long = model(x, num_loops=8, output_loop_states=True)
        short = model(x, num_loops=num_loops, output_loop_states=True, exit="last")
    assert len(short.loop_hidden_states) == num_loops
    assert len(long.loop_hidden_states) == 8
    torch.testing.assert_close(short.loop_hidden_states[-1], long.loop_hidden_states[num_loops - 1])
    torch.testing.assert_close(short.logits, model.lm_head(long.loop_hidden_states[num_loops - 1]))
    assert short.exit_probs.shape == (2, 10, num_loops)


def test_loops_differ(tiny_model_factory):
    model = tiny_model_factory()
    with torch.no_grad():
        out = model(_ids(), output_loop_states=True)
    assert not torch.allclose(out.loop_hidden_states[0], out.loop_hidden_states[1])


def test_cached_generation_equals_uncached_greedy(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids(b=1, s=6)
    with torch.no_grad():
        cached = model.generate(x, max_new_tokens=10, do_sample=False, num_loops=3)
        seq = x
        for _ in range(10):
            nxt = model(seq, use_cache=False, num_loops=3).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_per_loop_cache_slots(tiny_model_factory):
    model = tiny_model_factory()
    with torch.no_grad():
        out = model(_ids(), num_loops=5, use_cache=True)
    cache = out.cache
    assert len(cache.layers) == 5 * model.config.num_hidden_layers
    # each (loop, layer) slot holds its own keys: loop 0 and loop 1 of layer 0 differ
    assert not torch.allclose(cache.layers[0].keys, cache.layers[2].keys)


def test_generate_accepts_a_transformers_dynamic_cache(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids(b=1, s=6)
    with torch.no_grad():
        ours = model.generate(x, max_new_tokens=5, do_sample=False)
        theirs = model.generate(x, max_new_tokens=5, do_sample=False, past_key_values=DynamicCache(config=model.config))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_does_not_change_real_tokens(attn):
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(_attn_implementation=attn)).eval()
    row = _ids(b=1, s=7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(row, output_loop_states=True)
        pad = model(padded, attention_mask=mask, output_loop_states=True)
    torch.testing.assert_close(pad.logits[:, 3:], plain.logits, atol=1e-5, rtol=0)
    for a, b in zip(pad.loop_hidden_states, plain.loop_hidden_states):
        torch.testing.assert_close(a[:, 3:], b, atol=1e-5, rtol=0)
    assert torch.isfinite(pad.logits).all()


def test_batched_left_padded_generation_matches_single(tiny_model_factory):
    model = tiny_model_factory()
    a, b = _ids(b=1, s=8, seed=1), _ids(b=1, s=5, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        only_b = model.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 3:], only_b[0])


def test_sdpa_and_eager_agree():
    torch.manual_seed(0)
    eager = OuroForCausalLM(tiny_config(_attn_implementation="eager")).eval()
    sdpa = OuroForCausalLM(tiny_config(_attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(eager(x).logits, sdpa(x).logits, atol=1e-5, rtol=0)


def test_logits_to_keep(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids()
    with torch.no_grad():
        full = model(x).logits
        last = model(x, logits_to_keep=1).logits
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, full[:, -1:])


def test_expected_exit_is_the_mixture_of_loop_logits(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids()
    with torch.no_grad():
        out = model(x, exit="expected", output_loop_states=True)
        per_loop = loop_logits(model.lm_head, out.loop_hidden_states)  # [T,B,S,V]
    mixture = (per_loop * out.exit_probs.permute(2, 0, 1)[..., None]).sum(0)
    torch.testing.assert_close(out.logits, mixture, atol=1e-5, rtol=0)


def test_loop_logits_at_positions(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids()
    with torch.no_grad():
        out = model(x, output_loop_states=True)
    pos = torch.tensor([[9, 2], [0, 5]])
    chosen = loop_logits(model.lm_head, out.loop_hidden_states, pos)
    assert chosen.shape == (4, 2, 2, 512)
    full = loop_logits(model.lm_head, out.loop_hidden_states)
    torch.testing.assert_close(chosen[:, 1, 1], full[:, 1, 5])
    with pytest.raises(ValueError, match="outside a sequence of length 10"):
        loop_logits(model.lm_head, out.loop_hidden_states, torch.tensor([10]))


def test_exit_distribution_and_threshold_by_hand():
    gate = torch.tensor([[0.0, 0.0, 0.0]])  # lambda = 0.5 each
    probs = exit_distribution(gate)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.25]]))
    assert threshold_exit_index(probs, 0.5).item() == 0
    assert threshold_exit_index(probs, 0.7).item() == 1
    assert threshold_exit_index(probs, 1.0).item() == 2


def test_lora_wraps_and_training_reduces_loss(tiny_model_factory):
    from peft import LoraConfig, get_peft_model

    model = tiny_model_factory().train()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    wrapped = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert wrapped == set(targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = _ids(b=4, s=12)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_gradient_checkpointing_gives_same_gradients(tiny_model_factory):
    x = _ids()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model_factory().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(x, labels=x, exit="expected").loss
        loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bf16_forward_and_backward(tiny_model_factory):
    model = tiny_model_factory().to(torch.bfloat16).train()
    x = _ids()
    out = model(x, labels=x, output_loop_states=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_loops(tiny_model_factory, bad):
    with pytest.raises(ValueError, match="num_loops must be a positive integer"):
        tiny_model_factory()(_ids(), num_loops=bad)


def test_bad_exit_modes(tiny_model_factory):
    model = tiny_model_factory()
    with pytest.raises(ValueError, match="unknown exit mode 'first'"):
        model(_ids(), exit="first")
    with pytest.raises(ValueError, match="exit loop index 4 is out of range for num_loops=4"):
        model(_ids(), exit=4)
    with pytest.raises(ValueError, match="exit_threshold must be in"):
        model(_ids(), exit="threshold", exit_threshold=1.5)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="total_ut_steps must be >= 1"):
        tiny_config(total_ut_steps=0)
    with pytest.raises(ValueError, match="exit_mode must be one of"):
        tiny_config(exit_mode="sometimes")
    model = OuroForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(_ids(), attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model.model()


@pytest.mark.parametrize("bad", [-1, -4, 4, 2.0, "first", "Last"])
def test_exit_takes_only_modes_and_loop_indices_in_range(tiny_model_factory, bad):
    """Issue [hardening]: exit=-1 is refused (a negative loop means "none" elsewhere), as is anything
    that is not a mode or a 0-based loop index < num_loops; the message names exit=."""
    model = tiny_model_factory()
    with pytest.raises(ValueError, match="exit"):
        model(_ids(), exit=bad)


def test_exit_accepts_every_valid_value(tiny_model_factory):
    import numpy as np

    model = tiny_model_factory()
    x = _ids()
    with torch.no_grad():
        states = model(x, output_loop_states=True, exit="last").loop_hidden_states
        for t in range(4):
            torch.testing.assert_close(model(x, exit=t).logits, model.lm_head(states[t]))
        torch.testing.assert_close(model(x, exit=np.int64(3)).logits, model(x, exit="last").logits)
        for mode in ("last", "threshold", "expected", None):
            assert torch.isfinite(model(x, exit=mode).logits).all()
        assert model(x, num_loops=6, exit=5).logits.shape == (2, 10, 512)


def test_over_long_sequences_are_refused_naming_max_position_embeddings(tiny_model_factory):
    model = tiny_model_factory(max_position_embeddings=16)
    with torch.no_grad():
        assert model(_ids(s=16)).logits.shape[1] == 16  # exactly the limit is fine
        with pytest.raises(ValueError, match="sequence of 17, longer than the model's max_position_embeddings=16"):
            model(_ids(s=17))
        with pytest.raises(ValueError, match="max_position_embeddings=16"):
            model(inputs_embeds=torch.randn(1, 17, 64))
        # cached tokens count: 12 cached + 5 new = 17
        first = model(_ids(b=1, s=12), use_cache=True)
        with pytest.raises(ValueError, match="5 tokens after 12 cached ones make a sequence of 17"):
            model(_ids(b=1, s=5), cache=first.cache, use_cache=True)
        # generation stops with the same error instead of reading rotary positions past the limit
        with pytest.raises(ValueError, match="max_position_embeddings=16"):
            model.generate(_ids(b=1, s=10), max_new_tokens=10, min_new_tokens=10, do_sample=False)


@pytest.mark.parametrize("bad_id", [512, 10_000, -1])
def test_token_ids_outside_the_vocabulary_are_refused(tiny_model_factory, bad_id):
    model = tiny_model_factory()
    x = _ids()
    x[1, 4] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids holds the token id {bad_id}, outside .*\[0, 512\)"):
        model(x)
    with pytest.raises(ValueError, match="vocab_size=512"):
        model.model(input_ids=x)
    edge = _ids()
    edge[0, 0], edge[1, 1] = 0, 511  # both ends of the vocabulary are fine
    with torch.no_grad():
        assert torch.isfinite(model(edge).logits).all()


def test_attention_masks_must_be_zero_or_one(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids()
    for bad in (0.5, 2, -1):
        mask = torch.ones(2, 10)
        mask[0, 3] = bad
        with pytest.raises(ValueError, match=rf"attention_mask must hold only 0 \(padding\) and 1 .*{bad}"):
            model(x, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(x, attention_mask=torch.full((2, 10), 2, dtype=torch.long))
    # 0/1 in any dtype, and boolean masks, are fine and equal
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        for m in (mask.float(), mask.bool(), mask.to(torch.bfloat16), mask.int()):
            torch.testing.assert_close(model(x, attention_mask=m).logits, ref, atol=0, rtol=0)


def test_input_checks_cost_one_host_sync_per_forward(tiny_model_factory, monkeypatch):
    """The id and mask checks share the sync the padding analysis already made: one .tolist() per forward
    with a mask, one without; none of them while torch.compile traces."""
    from loopalign.models.ouro import modeling_ouro

    model = tiny_model_factory()
    x = _ids()
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :2] = 0
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    with torch.no_grad():
        model(x, attention_mask=mask)
        assert len(calls) == 1, calls
        calls.clear()
        model(x)
        assert len(calls) == 1, calls
        calls.clear()
        model(inputs_embeds=torch.randn(2, 10, 64))
        assert calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    bad = x.clone()
    bad[0, 0] = 600
    assert modeling_ouro._check_input_values(bad, mask.float() / 2, 512, check=not torch.compiler.is_compiling())


@pytest.mark.parametrize("layers,expected", [(24, 1_434_652_673), (48, 2_667_974_657)])
def test_parameter_count_of_released_shapes(layers, expected):
    from loopalign import OuroConfig

    with torch.device("meta"):
        model = OuroForCausalLM(OuroConfig(num_hidden_layers=layers))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_the_cache_is_taken_and_returned_under_both_names(tiny_model_factory):
    """transformers 5.24 renamed past_key_values to cache; the model takes and returns both, and its
    outputs carry the field the installed transformers' generate reads."""
    import warnings
    from dataclasses import fields

    from transformers.modeling_outputs import BaseModelOutputWithPast

    from loopalign.compat import CACHE_FIELD

    assert CACHE_FIELD in {f.name for f in fields(BaseModelOutputWithPast)}
    model = tiny_model_factory()
    prompt, nxt = _ids(b=1, s=6), _ids(b=1, s=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = model(prompt, use_cache=True)
        assert CACHE_FIELD in first.keys() and first.cache is first.past_key_values
        new = model(nxt, cache=first.cache, use_cache=True).logits
        old = model(nxt, past_key_values=model(prompt, use_cache=True).cache, use_cache=True).logits
        full = model(torch.cat([prompt, nxt], dim=1), use_cache=False).logits[:, -1:]
        torch.testing.assert_close(new, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(old, full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="not both"):
            model(nxt, cache=first.cache, past_key_values=first.cache)
