"""Our Huginn against the public reference implementation's numbers (tests/fixtures/huginn_reference; made with
seal-rg/recurrent-pretraining's raven_modeling_minimal.py, see its README)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import loopalign.models  # noqa: F401  (registers model_type "huginn_raven")
from loopalign.models.huginn import HuginnConfig, HuginnForCausalLM

ATOL = 1e-4
ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "huginn_reference"


@pytest.fixture(scope="module")
def expected():
    return load_file(str(ROOT / "expected.safetensors"))


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(ROOT / "checkpoint", dtype=torch.float32).eval()


def close(actual, expected_tensor, name):
    diff = float((actual.float() - expected_tensor).abs().max())
    assert diff <= ATOL, f"{name}: max |diff| {diff:.2e} > {ATOL}"


def test_auto_classes_load_the_released_layout_without_remote_code(model):
    config_json = json.loads((ROOT / "checkpoint" / "config.json").read_text())
    assert "auto_map" in config_json and "tie_word_embeddings" not in config_json  # the real layout
    config = AutoConfig.from_pretrained(ROOT / "checkpoint")
    assert isinstance(config, HuginnConfig) and isinstance(model, HuginnForCausalLM)
    assert config.num_hidden_layers == 2 and config.total_ut_steps == 4  # contract names: core layers, default steps
    # tied head: no lm_head.weight in the file, the head is the embedding
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    from safetensors.torch import load_file as load

    saved = load(str(ROOT / "checkpoint" / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) - {"lm_head.weight"}
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


@torch.no_grad()
def test_embedding_and_prelude(model, expected):
    ids = expected["input_ids"]
    close(model.transformer.wte(ids) * model.config.embed_scale, expected["embeds"], "embeds")
    seen = {}
    handle = model.transformer.adapter.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    model(ids, input_states=expected["init_state"], num_steps=1)
    handle.remove()
    close(seen["in"][..., 64:], expected["prelude_out"], "prelude_out")  # adapter input = cat(state, embedded)


@pytest.mark.parametrize("steps", [1, 4, 8])
@torch.no_grad()
def test_logits_from_the_recorded_and_the_zero_state(model, expected, steps):
    ids = expected["input_ids"]
    out = model(ids, input_states=expected["init_state"].clone(), num_steps=steps)
    close(out.logits, expected[f"logits_steps{steps}"], f"logits_steps{steps}")
    assert out.logits.dtype == torch.float32
    zero = model(ids, num_steps=steps, init_scale=0.0)
    close(zero.logits, expected[f"logits_steps{steps}_zero_init"], f"logits_steps{steps}_zero_init")
    # the contract's name for the same count
    assert torch.equal(model(ids, num_loops=steps, init_scale=0.0).logits, zero.logits)


@torch.no_grad()
def test_every_step_state_adapter_output_and_readout(model, expected):
    ids = expected["input_ids"]
    adapter = []
    handle = model.transformer.adapter.register_forward_hook(lambda m, i, o: adapter.append(o))
    out = model(ids, input_states=expected["init_state"], num_loops=4, output_loop_states=True, output_loop_logits=True)
    handle.remove()
    close(torch.stack(adapter), expected["adapter_out"], "adapter_out")
    close(torch.stack(out.loop_latent_states), expected["step_states"], "step_states")
    close(torch.stack(out.loop_logits), expected["step_logits"], "step_logits")
    close(out.latent_states, expected["latent_states"], "latent_states")
    close(out.loop_hidden_states[-1], expected["final_hidden"], "final_hidden")
    # the readout states are what the head reads: loop_logits = lm_head(loop_hidden_states)
    for t in range(4):
        torch.testing.assert_close(model.lm_head(out.loop_hidden_states[t]), out.loop_logits[t])
    assert torch.equal(out.exit_probs[..., -1], torch.ones(2, 12))


@torch.no_grad()
def test_coda_input_and_output(model, expected):
    ids = expected["input_ids"]
    seen = {}
    pre = model.transformer.coda[0].register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    post = model.transformer.coda[-1].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model(ids, input_states=expected["init_state"], num_steps=4)
    pre.remove(), post.remove()
    close(seen["in"], expected["coda_in"], "coda_in")
    close(seen["out"], expected["coda_out"], "coda_out")


@torch.no_grad()
def test_loss_equals_the_reference_with_transformers_label_convention(model, expected):
    """The reference does not shift labels (its labels are pre-shifted); ours shifts inside, so labels=input_ids."""
    ids = expected["input_ids"]
    ours = model(ids, input_states=expected["init_state"], num_steps=4, labels=ids).loss
    close(ours.reshape(1), expected["loss_steps4"], "loss_steps4")
    shifted = expected["labels"]
    assert torch.equal(shifted[:, :-1], ids[:, 1:]) and bool((shifted[:, -1] == -100).all())


@torch.no_grad()
def test_default_random_state_draws_as_the_reference(model, expected):
    """The reference drew init_state right after manual_seed(seed + 2); our draw consumes the RNG the same way."""
    torch.manual_seed(20250209)
    out = model(expected["input_ids"], num_steps=4)  # config.init_scale = 1.0: a random state
    close(out.logits, expected["logits_steps4"], "logits_steps4 (default random state)")


@torch.no_grad()
def test_greedy_cached_generation(model, expected):
    prompt = expected["input_ids"][:1, :6]
    gen = model.generate(
        prompt,
        max_new_tokens=8,
        do_sample=False,
        num_steps=4,
        init_scale=0.0,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert torch.equal(gen.sequences, expected["generated_ids"])
    close(torch.stack(gen.logits), expected["generated_logits"], "generated_logits")
    # the contract's spelling gives the same tokens
    again = model.generate(prompt, max_new_tokens=8, do_sample=False, num_loops=4, init_scale=0.0)
    assert torch.equal(again, expected["generated_ids"])
