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


def test_hooks_capture_and_inject_on_a_plain_causal_lm():
    from loopalign.hooks import add_vector, capture_activations

    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 6))
    ref = model(input_ids=ids, output_hidden_states=True)
    with capture_activations(model, [(0, 0), (0, 1)], positions=torch.tensor([1, 4])) as cap:
        model(input_ids=ids)
    for layer in (0, 1):  # hidden_states[0] is the embedding output; [layer + 1] the residual after it
        assert torch.allclose(cap.get(0, layer), ref.hidden_states[layer + 1][:, [1, 4]], atol=1e-6)
    vec = torch.randn(32)
    with add_vector(model, vec, loop=0, layer=1, strength=3.0, start=4) as record:
        steered = model(input_ids=ids).logits
    assert record.calls == 1
    assert torch.allclose(steered[:, :4], ref.logits[:, :4], atol=1e-6)  # columns before start untouched
    assert not torch.allclose(steered[:, 4:], ref.logits[:, 4:], atol=1e-3)
    with pytest.raises(ValueError, match="never reached"), add_vector(model, vec, loop=1, layer=0):
        model(input_ids=ids)


def test_injection_covers_generated_tokens_of_a_plain_model():
    """Under generate with a KV cache, columns count cached tokens: a vector from column 6 on changes only
    tokens generated after the prompt."""
    from loopalign.hooks import add_vector

    model = tiny_gpt2()
    ids = torch.randint(3, 64, (1, 6))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids=ids, **kwargs)
    with add_vector(model, 50 * torch.randn(32), loop=0, layer=1, start=6) as record:
        steered = model.generate(input_ids=ids, **kwargs)
    assert record.calls == 3  # the prompt forward (columns 0..5) is untouched; the 3 later steps read columns 6..8
    assert torch.equal(plain[:, :7], steered[:, :7]) and not torch.equal(plain, steered)


def test_compiling_layers_needs_ouro_layers():
    from loopalign.speed import compile_decoder_layers

    with pytest.raises(TypeError, match="compile_layers compiles Ouro decoder layers; LlamaDecoderLayer"):
        compile_decoder_layers(tiny_llama())


def test_ouro_forward_returns_loop_logits_itself():
    model = tiny_ouro()
    ids = torch.randint(0, 64, (2, 5))
    out = model(input_ids=ids, num_loops=3, output_loop_logits=True, output_loop_states=True)
    assert len(out.loop_logits) == 3 and out.loop_logits[0].shape == (2, 5, 64)
    assert torch.allclose(out.loop_logits[-1], out.logits, atol=1e-6)  # exit "last": the last loop's readout
    assert model(input_ids=ids).loop_logits is None
