"""The fast paths keep the numerics: maskless right padding, selective activation checkpointing,
compiled decoder layers, merged LoRA for evaluation."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from loopalign import OuroForCausalLM, tiny_config
from loopalign.lora import merged_lora, route_lora_by_loop
from loopalign.models.ouro.modeling_ouro import build_attention_mask
from loopalign.speed import CHECKPOINT_POLICIES, checkpointing_kwargs, compile_decoder_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(b=2, s=10, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, s), generator=g)


def _lora(model, seed=1):
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an effect
            torch.nn.init.normal_(p, std=0.05)
    return peft_model


# ----- maskless right padding ---------------------------------------------------------------------
def test_mask_is_skipped_only_for_right_padding():
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    assert build_attention_mask(right, 4, 0, torch.float32, "cpu") is None
    assert build_attention_mask(torch.ones(2, 4), 4, 0, torch.float32, "cpu") is None
    for mask in (left, holes):
        assert build_attention_mask(mask, 4, 0, torch.float32, "cpu").shape == (2, 1, 4, 4)
    # a cached prefix: the new token must not see padded cache entries
    with_past = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]])
    assert build_attention_mask(with_past, 1, 4, torch.float32, "cpu").shape == (2, 1, 1, 5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_right_padded_rows_equal_their_unpadded_runs(attn):
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(_attn_implementation=attn)).eval()
    long, short = _ids(b=1, s=9, seed=1), _ids(b=1, s=5, seed=2)
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, 5:] = 0
    with torch.no_grad():
        both = model(batch, attention_mask=mask, output_loop_states=True, use_cache=False)
        alone = model(short, output_loop_states=True, use_cache=False)
    for a, b in zip(both.loop_hidden_states, alone.loop_hidden_states):
        torch.testing.assert_close(a[1:, :5], b, atol=1e-5, rtol=0)
    torch.testing.assert_close(both.logits[1:, :5], alone.logits, atol=1e-5, rtol=0)
    assert torch.isfinite(both.logits).all()


# ----- selective activation checkpointing ---------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.count = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


def _grads_and_backward_recomputes(policy):
    """Gradients, and the numbers of matmuls and attention forwards run during backward."""
    x = _ids(b=2, s=12)
    torch.manual_seed(0)
    model = _lora(OuroForCausalLM(tiny_config())).train()
    if policy is not None:
        model.activation_checkpointing_enable({"policy": policy})
    loss = model(input_ids=x, labels=x).loss
    matmuls = _CountOps((torch.ops.aten.mm.default, torch.ops.aten.addmm.default))
    attention = _CountOps(CHECKPOINT_POLICIES["save_attention"])
    with matmuls, attention:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, matmuls.count, attention.count


def test_checkpoint_policies_give_the_same_gradients_and_recompute_less():
    reference, plain_mms, plain_attn = _grads_and_backward_recomputes(None)
    assert plain_attn == 0
    mms, attn = {}, {}
    for policy in CHECKPOINT_POLICIES:
        grads, mms[policy], attn[policy] = _grads_and_backward_recomputes(policy)
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)
    # full re-runs every layer's forward in backward: 2 layers x 4 loops attention calls, and its matmuls
    assert attn["full"] == 8
    recomputed_full = mms["full"] - plain_mms
    assert recomputed_full >= 8 * 7 * 3  # 7 LoRA projections, 3 matmuls each, per layer call
    # save_attention keeps attention; save_matmuls keeps attention and (nearly) every matmul
    assert attn["save_attention"] == 0 and mms["save_attention"] == mms["full"]
    assert attn["save_matmuls"] == 0
    assert mms["save_matmuls"] - plain_mms < recomputed_full / 10


def test_policy_comes_through_the_trainer_kwargs_with_every_n_layers():
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(num_hidden_layers=4)).train()
    # the dict a TrainingArguments(activation_checkpointing_kwargs=...) hands to the model
    model.gradient_checkpointing_enable({"policy": "save_matmuls", "every_n_layers": 2})
    layers = model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]
    context_fn = layers[0]._gradient_checkpointing_func.keywords["context_fn"]
    assert context_fn.args[0].args[0] == CHECKPOINT_POLICIES["save_matmuls"]
    x = _ids()
    model(x, labels=x).loss.backward()
    with pytest.raises(ValueError, match="checkpoint_policy must be one of"):
        model.activation_checkpointing_enable({"policy": "most"})


def test_checkpoint_policy_errors():
    with pytest.raises(ValueError, match="checkpoint_policy must be one of"):
        checkpointing_kwargs("most")
    with pytest.raises(ValueError, match="use_reentrant"):
        checkpointing_kwargs("save_matmuls", {"use_reentrant": True})
    assert checkpointing_kwargs("full", {"use_reentrant": True}) == {"use_reentrant": True}


# ----- compiled decoder layers --------------------------------------------------------------------
def test_compiled_layers_match_eager_and_share_graphs_across_layers_and_loops():
    import torch._dynamo

    torch._dynamo.reset()
    x = _ids(b=2, s=12)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _lora(OuroForCausalLM(tiny_config(num_hidden_layers=3))).train()
        if compiled:
            assert compile_decoder_layers(model, backend="aot_eager") == 3
            torch._dynamo.utils.counters.clear()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
        if compiled:
            # 3 layers x 4 loops share graphs: one for the first layer call (its input, the frozen
            # embedding, needs no grad) and one for the 11 others
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
            assert not torch._dynamo.utils.counters["graph_break"]
            # cached generation runs the plain layers and still works
            out = model.generate(input_ids=x[:, :4], max_new_tokens=3, do_sample=False)
            assert out.shape == (2, 7)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compile_needs_ouro_layers():
    with pytest.raises(TypeError, match="no Ouro decoder layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


# ----- merged LoRA --------------------------------------------------------------------------------
def test_merged_lora_equals_adapters_and_restores_weights_exactly():
    model = _lora(OuroForCausalLM(tiny_config())).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _ids()
    with torch.no_grad():
        unmerged = model(input_ids=x, output_loop_states=True).loop_hidden_states
        with merged_lora(model) as merged:
            assert merged
            inside = model(input_ids=x, output_loop_states=True).loop_hidden_states
            q = model.base_model.model.model.layers[0].self_attn.q_proj
            assert q.merged and not torch.equal(q.base_layer.weight, base[f"{_name(model, q)}.base_layer.weight"])
        after = model(input_ids=x, output_loop_states=True).loop_hidden_states
    for a, b in zip(unmerged, inside):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(unmerged, after):
        assert torch.equal(a, b)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def _name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def test_merged_lora_in_bf16_restores_weights_bit_for_bit():
    model = _lora(OuroForCausalLM(tiny_config())).to(torch.bfloat16).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with merged_lora(model):
            pass
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_merged_lora_refuses_what_it_cannot_merge():
    plain = OuroForCausalLM(tiny_config())
    with merged_lora(plain) as merged:
        assert not merged
    with pytest.raises(RuntimeError, match="no PEFT LoRA modules"):
        with merged_lora(plain, strict=True):
            pass
    routed = _lora(OuroForCausalLM(tiny_config()))
    route_lora_by_loop(routed, "last")
    with merged_lora(routed) as merged:
        assert not merged
    with pytest.raises(RuntimeError, match="routed to loops 'last'"):
        with merged_lora(routed, strict=True):
            pass


def test_merged_lora_restores_after_an_error():
    model = _lora(OuroForCausalLM(tiny_config())).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(KeyError):
        with merged_lora(model):
            raise KeyError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_cpu_runs_default_to_one_thread_unless_omp_says_otherwise(monkeypatch):
    from loopalign.speed import set_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert set_cpu_threads(on_cpu=True) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_cpu_threads(on_cpu=True) == 2 and torch.get_num_threads() == 2
        assert set_cpu_threads(on_cpu=False) is None and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "many")
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            set_cpu_threads(on_cpu=True)
    finally:
        torch.set_num_threads(before)


def test_cpu_bf16_is_native_reads_the_flags_of_a_bf16_matrix_multiply():
    """The recipe warns that bf16 autocast is emulated (slower than float32) where the CPU has neither AMX nor
    AVX-512 BF16; /proc/cpuinfo's flags decide, and a text without flags decides nothing."""
    from loopalign.speed import cpu_bf16_is_native

    sapphire = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    cascade = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
    cooper = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert cpu_bf16_is_native(sapphire) is True
    assert cpu_bf16_is_native(cooper) is True
    assert cpu_bf16_is_native(cascade) is False
    assert cpu_bf16_is_native("Hardware\t: some board\n") is None
    here = cpu_bf16_is_native()
    assert here in (True, False, None)
