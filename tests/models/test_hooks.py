"""Loop-aware capture / injection hooks."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loopalign.hooks import add_vector, capture_activations, decoder_layers


def _ids(b=2, s=10):
    return torch.randint(3, 512, (b, s), generator=torch.Generator().manual_seed(0))


def test_capture_equals_layer_states(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids()
    with torch.no_grad():
        ref = model(x, output_layer_states=True)
        with capture_activations(model, [(2, 1), (0, 0)], positions=torch.tensor([[9, 1], [4, 0]])) as cap:
            model(x)
        with capture_activations(model, [(3, 0)]) as full:
            model(x)
    torch.testing.assert_close(cap.get(2, 1)[0, 0], ref.layer_hidden_states[2][1][0, 9])
    torch.testing.assert_close(cap[(0, 0)][1, 1], ref.layer_hidden_states[0][0][1, 0])
    torch.testing.assert_close(full.get(3, 0), ref.layer_hidden_states[3][0])


def test_capture_during_generation_covers_generated_tokens(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids(b=1, s=6)
    with torch.no_grad(), capture_activations(model, [(3, 1)]) as cap:
        out = model.generate(x, max_new_tokens=4, do_sample=False)
    # prefill sees 6 columns, then 3 more decode steps (the 4th token is never fed back)
    assert cap.get(3, 1).shape[1] == out.shape[1] - 1
    with torch.no_grad():
        ref = model(out[:, :-1], output_layer_states=True)
    torch.testing.assert_close(cap.get(3, 1), ref.layer_hidden_states[3][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("loop", [0, 2, 3])
def test_injection_changes_exactly_the_chosen_loop_and_positions(tiny_model_factory, loop):
    model = tiny_model_factory()
    x = _ids()
    vec = torch.randn(64)
    with torch.no_grad():
        base = model(x, output_layer_states=True)
        with add_vector(model, vec, loop=loop, layer=1, strength=2.0, start=torch.tensor([5, 7])) as inj:
            out = model(x, output_layer_states=True)
    assert inj.calls == 1
    for t in range(4):
        for layer in range(2):
            a, b = out.layer_hidden_states[t][layer], base.layer_hidden_states[t][layer]
            before = (t, layer) < (loop, 1)
            if before:
                torch.testing.assert_close(a, b, atol=0, rtol=0)
            # columns before each row's start are never touched (causal attention)
            torch.testing.assert_close(a[0, :5], b[0, :5], atol=0, rtol=0)
            torch.testing.assert_close(a[1, :7], b[1, :7], atol=0, rtol=0)
    delta = out.layer_hidden_states[loop][1] - base.layer_hidden_states[loop][1]
    torch.testing.assert_close(delta[0, 5:], (2.0 * vec).expand(5, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(delta[1, 7:], (2.0 * vec).expand(3, -1), atol=1e-5, rtol=0)


def test_injection_during_generate_covers_generated_tokens(tiny_model_factory):
    model = tiny_model_factory()
    x = _ids(b=1, s=6)
    vec = torch.randn(64) * 20
    with torch.no_grad():
        plain = model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with add_vector(model, vec, loop=3, layer=1, start=6) as inj:
            steered = model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    # start=6 is the first generated column: the prefill is untouched, every later step is steered
    assert inj.calls == 5
    assert steered[0, 6] == plain[0, 6]
    assert not torch.equal(steered, plain)


def test_hooks_are_removed_on_exit_and_on_error(tiny_model_factory):
    model = tiny_model_factory()
    layers = decoder_layers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with add_vector(model, torch.ones(64), loop=0, layer=0):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in layers)


def test_hooks_work_under_peft(tiny_model_factory):
    model = tiny_model_factory()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    x = _ids()
    with torch.no_grad(), capture_activations(peft_model, [(1, 0)], positions=[3]) as cap:
        peft_model(input_ids=x)
    assert cap.get(1, 0).shape == (2, 1, 64)


def test_hook_errors(tiny_model_factory):
    model = tiny_model_factory()
    with pytest.raises(ValueError, match="layer index 2 is out of range: the model has 2 layers"):
        with capture_activations(model, [(0, 2)]):
            pass
    with pytest.raises(ValueError, match="loop index must be an int >= 0"):
        with add_vector(model, torch.ones(64), loop=-1, layer=0):
            pass
    with pytest.raises(ValueError, match="vector must be \\[H\\] or \\[B,H\\] with H=64"):
        with add_vector(model, torch.ones(32), loop=0, layer=0):
            pass
    with capture_activations(model, [(5, 0)], positions=[2]) as cap, torch.no_grad():
        model(_ids())  # 4 loops: loop 5 never runs
    with pytest.raises(RuntimeError, match="not every requested position was seen"):
        cap.get(5, 0)
    with pytest.raises(KeyError, match="was not requested"):
        cap.get(0, 0)
    with capture_activations(model, [(0, 0)], positions=[[12]]) as cap, torch.no_grad():
        model(_ids(b=1))
    with pytest.raises(RuntimeError, match="position past the sequence end"):
        cap.get(0, 0)


def test_injection_at_a_loop_the_forward_never_reaches_raises(tiny_model_factory):
    """Issue [hardening]: add_vector at loop 5 of a 4-loop forward must not be a silent no-op; the
    error names the loop asked for and the loops that ran (forward, generate, and a direct layer call)."""
    model = tiny_model_factory()
    layers = decoder_layers(model)
    x = _ids()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"loop 5 \(0-based\) is never reached.*ran loops 0\.\.3 \(num_loops=4\)"):
            with add_vector(model, torch.ones(64), loop=5, layer=1):
                model(x)
        with pytest.raises(ValueError, match=r"loop 2 \(0-based\) is never reached.*ran loops 0\.\.1 \(num_loops=2\)"):
            with add_vector(model, torch.ones(64), loop=2, layer=0):
                model.generate(x[:1], max_new_tokens=3, do_sample=False, num_loops=2)
        # a layer called without num_loops (another caller): the check runs when the context exits
        from loopalign.models.ouro.modeling_ouro import rotary_cos_sin

        h = torch.randn(1, 3, 64)
        cos_sin = rotary_cos_sin(torch.arange(3)[None], 16, 1e6, h.dtype)
        with pytest.raises(ValueError, match=r"loop 3 \(0-based\) is never reached.*ran loops 0, 1\b"):
            with add_vector(model, torch.ones(64), loop=3, layer=0) as inj:
                for t in (0, 1):
                    layers[0](h, position_embeddings=cos_sin, loop_index=t, token_positions=torch.arange(3))
        assert inj.calls == 0 and inj.loops_run == {0, 1}
        # reached: fine; no forward at all: nothing to say
        with add_vector(model, torch.ones(64), loop=3, layer=1) as inj:
            model(x)
        assert inj.calls == 1 and inj.loops_run == {0, 1, 2, 3}
        with add_vector(model, torch.ones(64), loop=9, layer=1) as inj:
            pass
        assert inj.calls == 0
    assert all(not layer._forward_hooks for layer in layers)
    # capture names the loops that ran too
    with capture_activations(model, [(6, 0)]) as cap, torch.no_grad():
        model(x, num_loops=3)
    with pytest.raises(RuntimeError, match=r"\(loop=6, layer=0\) never ran: the forward ran loops 0\.\.2"):
        cap.get(6, 0)
