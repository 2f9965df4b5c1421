"""Retrofitted recurrence: a tiny Llama turned into a looped model (loopalign.models.retrofit)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopalign.models.contract import is_looped, loop_forward, looped_layers, trained_loops
from loopalign.models.huginn import HuginnForCausalLM
from loopalign.models.retrofit import RetrofitConfig, retrofit_recurrence


def tiny_llama(layers=6, tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=tie,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm in the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def ids(b=2, s=10, seed=0):
    return torch.randint(3, 96, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_one_step_with_the_pass_through_adapter_is_the_original_model(tie):
    llama = tiny_llama(tie=tie)
    looped = retrofit_recurrence(llama, RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 6))).eval()
    assert isinstance(looped, HuginnForCausalLM) and looped.config.tie_embeddings == tie
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding too
    ref = llama(input_ids=x).logits
    out = looped(input_ids=x, num_loops=1, init_scale=1.0).logits
    assert torch.equal(out, ref), float((out - ref).abs().max())
    # with left padding, at the real tokens (Llama given the positions that count real tokens, as ours does)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded_ref = llama(input_ids=x, attention_mask=mask, position_ids=positions).logits
    padded = looped(input_ids=x, attention_mask=mask, num_loops=1).logits
    real = mask.bool()
    diff = float((padded[real] - padded_ref[real]).abs().max())
    assert diff <= 1e-6, diff
    # the random initial state is ignored by the [0 | I] adapter: any state gives the same logits
    assert torch.equal(looped(x, num_loops=1, input_states=torch.randn(2, 10, 32)).logits, ref)


@torch.no_grad()
def test_dropped_layers_equal_the_llama_without_them():
    llama = tiny_llama()
    looped = retrofit_recurrence(llama, RetrofitConfig(prelude=(0, 1), recurrent=(3, 5), coda=(5, 6))).eval()
    assert looped.config.retrofit["dropped"] == [1, 2]
    assert looped.config.n_layers_in_recurrent_block == 2 and len(looped_layers(looped)) == 2
    shorter = tiny_llama()
    shorter.model.layers = torch.nn.ModuleList([shorter.model.layers[i] for i in (0, 3, 4, 5)])
    shorter.config.num_hidden_layers = 4
    x = ids()
    assert torch.equal(looped(x, num_loops=1).logits, shorter(input_ids=x, use_cache=False).logits)


def test_more_steps_run_cache_and_train():
    llama = tiny_llama()
    looped = retrofit_recurrence(
        llama, RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 6), mean_recurrence=3, init_scale=0.0)
    )
    assert is_looped(looped) and trained_loops(looped) == 3
    x = ids()
    with torch.no_grad():
        looped.eval()
        one = looped(x, num_loops=1).logits
        out = loop_forward(looped, x, num_loops=3, output_loop_logits=True, logits_to_keep=0)
        # the pass-through adapter ignores the state, so until it is trained every step computes the same
        assert all(torch.equal(out.loop_logits[t], one) for t in range(3))
        kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, num_loops=3)
        cached = looped.generate(ids(1, 6), **kwargs)
        seq = ids(1, 6)
        for _ in range(5):
            nxt = looped(seq, num_loops=3, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(cached, seq)
    looped.train()
    opt = torch.optim.AdamW(looped.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = looped(x, num_steps=(1, 2), labels=x).loss
        opt.zero_grad()
        loss.backward()
        assert looped.transformer.adapter.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with torch.no_grad():  # trained, the adapter reads the state: steps now differ
        looped.eval()
        out = loop_forward(looped, x, num_loops=3, output_loop_logits=True, logits_to_keep=0)
        assert not torch.allclose(out.loop_logits[2], out.loop_logits[0], atol=1e-4)
    # the source model is untouched
    assert llama.model.layers[2].self_attn.q_proj.weight.grad is None


def test_bad_specs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="must be in this order and must not overlap"):
        RetrofitConfig(prelude=(0, 3), recurrent=(2, 4), coda=(4, 6))
    with pytest.raises(ValueError, match=r"RetrofitConfig.recurrent must hold at least one layer"):
        RetrofitConfig(prelude=(0, 2), recurrent=(2, 2), coda=(2, 6))
    with pytest.raises(ValueError, match="RetrofitConfig.coda must be a range"):
        RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(6, 4))
    with pytest.raises(ValueError, match="adapter_init"):
        RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 6), adapter_init="zeros")
    with pytest.raises(ValueError, match="past the model's 6 layers"):
        retrofit_recurrence(tiny_llama(), RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 8)))
    with pytest.raises(TypeError, match="Llama-family"):
        retrofit_recurrence(torch.nn.Linear(2, 2), RetrofitConfig(prelude=(0, 1), recurrent=(1, 2), coda=(2, 3)))


@torch.no_grad()
def test_the_sum_adapter_is_the_source_at_one_step_and_loops_untrained():
    """adapter_init='sum' ([I | I], zero initial state): the first step is the source model, and later steps run the
    recurrent block again on its own output plus the embedding, so loop counts differ before any training (the
    pass-through adapter gives every loop count the same logits until trained)."""
    llama = tiny_llama()
    spec = RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 6), adapter_init="sum", init_scale=0.0)
    looped = retrofit_recurrence(llama, spec).eval()
    x = ids()
    ref = llama(input_ids=x).logits
    assert torch.equal(looped(x, num_loops=1).logits, ref)
    two, three = looped(x, num_loops=2).logits, looped(x, num_loops=3).logits
    assert not torch.allclose(two, ref, atol=1e-4) and not torch.allclose(three, two, atol=1e-4)
    assert torch.isfinite(three).all()
    passing = retrofit_recurrence(llama, RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 6))).eval()
    assert torch.equal(passing(x, num_loops=2).logits, passing(x, num_loops=1).logits)  # the contrast
    with pytest.raises(ValueError, match="init_scale=0"):
        RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 6), adapter_init="sum", init_scale=1.0)
