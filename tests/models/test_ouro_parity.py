"""Our Ouro against the public reference implementation's numbers (tests/fixtures/ouro_reference)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import loopalign  # noqa: F401  (registers model_type "ouro")
from loopalign import OuroForCausalLM

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(request):

    root = Path(__file__).resolve().parents[1] / "fixtures" / "ouro_reference"
    return root / "checkpoint", load_file(str(root / "expected.safetensors"))


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request, reference):
    ckpt, _ = reference
    return AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation=request.param).eval()


def _valid(ref):
    return ref["attention_mask"].bool()


def test_auto_classes_load_our_implementation_without_remote_code(reference):
    ckpt, _ = reference
    assert "auto_map" in json.loads((ckpt / "config.json").read_text())  # the real layout, remote code not shipped
    config = AutoConfig.from_pretrained(ckpt)
    assert type(config).__name__ == "OuroConfig"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert isinstance(model, OuroForCausalLM)
    assert model.config.total_ut_steps == 4 and model.config.pad_token_id == 0


def test_state_dict_keys_match_checkpoint(reference):
    ckpt, _ = reference
    saved = set(load_file(str(ckpt / "model.safetensors")).keys())
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert set(model.state_dict().keys()) == saved


def test_per_loop_and_per_layer_states(model, reference):
    _, ref = reference
    v = _valid(ref)
    with torch.no_grad():
        out = model(
            ref["input_ids"], attention_mask=ref["attention_mask"], output_loop_states=True, output_layer_states=True
        )
    loop_states = torch.stack(out.loop_hidden_states)
    layer_states = torch.stack([torch.stack(per_loop) for per_loop in out.layer_hidden_states])
    assert loop_states.shape == ref["step_hidden"].shape
    torch.testing.assert_close(loop_states[:, v], ref["step_hidden"][:, v], atol=ATOL, rtol=0)
    torch.testing.assert_close(layer_states[:, :, v], ref["layer_outputs"][:, :, v], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(out.gate_logits)[:, v], ref["gate_logits"][:, v], atol=ATOL, rtol=0)
    step_logits = loopalign.loop_logits(model.lm_head, out.loop_hidden_states)
    torch.testing.assert_close(step_logits[:, v], ref["step_logits"][:, v], atol=ATOL, rtol=0)
    assert out.exit_probs.shape == (2, 12, 4)
    torch.testing.assert_close(out.exit_probs.sum(-1), torch.ones(2, 12))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(exit="last"), "logits_exit_last"),
        (dict(), "logits_exit_last"),  # config default: threshold 1.0 = last loop
        (dict(exit=1), "logits_exit_step1"),
        (dict(exit="threshold", exit_threshold=0.5), "logits_threshold_q05"),
    ],
)
def test_exit_modes(model, reference, kwargs, key):
    _, ref = reference
    v = _valid(ref)
    with torch.no_grad():
        logits = model(ref["input_ids"], attention_mask=ref["attention_mask"], **kwargs).logits
    torch.testing.assert_close(logits[v], ref[key][v], atol=ATOL, rtol=0)


def test_mixture_loss(model, reference):
    _, ref = reference
    labels = ref["input_ids"].masked_fill(ref["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(ref["input_ids"], attention_mask=ref["attention_mask"], labels=labels, exit="expected").loss
    assert abs(loss.item() - ref["loss_mixture_ce"].item()) < ATOL


def test_greedy_generation_with_cache(model, reference):
    _, ref = reference
    ids, am = ref["input_ids"][:1], ref["attention_mask"][:1]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, exit="last")
    assert torch.equal(out, ref["generated_ids"])
