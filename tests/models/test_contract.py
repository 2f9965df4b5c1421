"""The looped-model contract (loopalign.models.contract) on Ouro and on plain transformers causal LMs."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from loopalign.models.contract import (
    is_looped,
    loop_forward,
    loop_generate_kwargs,
    looped_layers,
    trained_loops,
)
from loopalign.models.ouro import OuroForCausalLM, tiny_config


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    ).eval()


def tiny_ouro():
    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=64)).eval()


def test_ouro_is_looped_and_returns_every_loop():
    model = tiny_ouro()
    ids = torch.randint(0, 64, (2, 6))
    assert is_looped(model) and trained_loops(model) == model.config.total_ut_steps
    out = loop_forward(model, ids, num_loops=3, output_loop_logits=True)
    assert len(out.loop_hidden_states) == 3 and out.exit_probs.shape == (2, 6, 3)
    direct = model(input_ids=ids, num_loops=3, output_loop_states=True)
    for t in range(3):
        assert torch.equal(out.loop_hidden_states[t], direct.loop_hidden_states[t])
        assert torch.allclose(out.loop_logits[t], model.lm_head(direct.loop_hidden_states[t]))
    assert len(looped_layers(model)) == model.config.num_hidden_layers
    assert loop_generate_kwargs(model, 2) == {"num_loops": 2}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_a_plain_causal_lm_is_one_loop(make):
    model = make()
    ids = torch.randint(3, 64, (2, 5))
    assert not is_looped(model) and trained_loops(model) == 1
    out = loop_forward(model, ids, torch.ones_like(ids), output_loop_logits=True, logits_to_keep=0)
    assert len(out.loop_hidden_states) == 1 and len(out.loop_logits) == 1
    # the loop state is what the head reads: its logits are the model's own
    assert torch.allclose(out.loop_logits[0], out.logits, atol=1e-5)
    assert torch.equal(out.exit_probs, torch.ones(2, 5, 1))
    assert len(looped_layers(model)) == model.config.num_hidden_layers
    assert loop_generate_kwargs(model, None) == {} and loop_generate_kwargs(model, 1) == {}
    with pytest.raises(ValueError, match="not a looped model: it runs one loop, asked for 2"):
        loop_forward(model, ids, num_loops=2)


def test_wrapped_models_answer_the_same():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not is_looped(model) and len(looped_layers(model)) == 3
    ouro = get_peft_model(tiny_ouro(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert is_looped(ouro) and trained_loops(ouro) == 4 and len(looped_layers(ouro)) == 2
