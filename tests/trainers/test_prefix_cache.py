"""GapSFTConfig.prefix_cache (loopalign.prefix_cache): the frozen lower layers of a plain causal LM computed once per
record and reused. One step's loss and every LoRA gradient equal the plain path's, on right-padded batches of
different lengths, with the readout above or below the lowest trained layer, with activation checkpointing; the
lower layers run once per record across epochs; what the cache cannot honour is refused by name.

Tolerance: float32, |cached - plain| <= 1e-5 + 1e-4 * |plain| for the loss and every gradient entry. The cached
states of a record come from a differently composed batch than the one they are replayed into (so from matmuls of
another shape), which moves float32 results by rounding only.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from loopalign import tiny_config
from loopalign.models.contract import looped_layers, unwrap
from loopalign.prefix_cache import PrefixCache
from loopalign.trainers import GapSFTConfig, GapSFTTrainer

RTOL, ATOL = 1e-4, 1e-5
LAYERS = 4
FIRST_TRAINED = 2  # LoRA on layers 2..3


def _llama(tok):
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
    ), ["q_proj", "v_proj", "o_proj", "down_proj"]  # fmt: skip


def _qwen2(tok):
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
    ), ["q_proj", "k_proj", "v_proj", "up_proj"]  # fmt: skip


def _gpt2(tok, dropout=0.0):
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=LAYERS, n_head=4, n_positions=512, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    ), ["c_attn", "c_proj", "c_fc"]  # fmt: skip


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


def _lora(targets, layers=range(FIRST_TRAINED, LAYERS)):
    # non-zero B, so the adapters change the forward and the adapters-off base differs from the tuned model
    return LoraConfig(r=4, target_modules=targets, layers_to_transform=list(layers), init_lora_weights=False)


def _trainer(model, tok, rows, tmp_path, targets, prefix_cache, replay=None, eval_rows=None, **options):
    torch.manual_seed(0)  # the same LoRA initialisation in both paths
    args = GapSFTConfig(
        output_dir=str(tmp_path / ("cached" if prefix_cache else "plain")), report_to="none", use_cpu=True,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True, prefix_cache=prefix_cache, seed=0,
        **options,
    )  # fmt: skip
    return GapSFTTrainer(
        model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=_lora(targets),
        replay_dataset=replay, eval_dataset=eval_rows,
    )  # fmt: skip


def _replay(rows):
    return datasets.Dataset.from_list(
        [{"input_ids": list(r["input_ids"][: 20 + i]), "completion_ids": [5, 6, 7 + i]} for i, r in enumerate(rows)]
    )


def _step(trainer, batch):
    """One compute_loss + backward -> (loss, {LoRA parameter name: grad})."""
    model = trainer.model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_close(plain, cached):
    (loss_p, grads_p), (loss_c, grads_c) = plain, cached
    torch.testing.assert_close(loss_c, loss_p, rtol=RTOL, atol=ATOL)
    assert grads_p.keys() == grads_c.keys()
    assert any(g.abs().max() > 0 for g in grads_p.values())
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.fixture(scope="module")
def rows(gap_dataset):
    records, _ = gap_dataset
    return datasets.Dataset.from_list(list(records)[:16])


def _padded_batch(trainer, order):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in order])
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # right padding of rows of different lengths
    return batch


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("probe_layer", [None, FIRST_TRAINED, 0], ids=["loop-state", "trained-layer", "frozen-layer"])
def test_loss_and_every_lora_gradient_equal_the_plain_path(family, probe_layer, gap_dataset, rows, tmp_path):
    _, tok = gap_dataset
    torch.manual_seed(0)
    base, targets = FAMILIES[family](tok)
    weights = {"lm": 1.0, "rr_distill": 1.0, "rr_probe": 1.0, "probe": 1.0, "replay": 0.5}
    options = dict(probe_layer=probe_layer, loss_weights=weights, replay_batch_size=3)
    plain = _trainer(copy.deepcopy(base), tok, rows, tmp_path, targets, False, _replay(rows), **options)
    cached = _trainer(copy.deepcopy(base), tok, rows, tmp_path, targets, True, _replay(rows), **options)
    cache = cached.prefix_cache
    assert cache.layer == FIRST_TRAINED
    expected_layers = (0, FIRST_TRAINED - 1) if probe_layer == 0 else (FIRST_TRAINED - 1,)
    assert cache.cached_layers == expected_layers
    # fit_base_probes (rr_probe) already ran the training records through the cache, in batches of 8
    assert cache.num_records == len(rows)
    cached.model.loop_probes.load_state_dict(plain.model.loop_probes.state_dict())
    for p, c in zip(plain.base_probes, cached.base_probes):
        torch.testing.assert_close(c.weight, p.weight, rtol=RTOL, atol=ATOL)
    cached.base_probes = plain.base_probes  # the same frozen probes, so the step compares only the forward
    # a batch in another order and composition than the one the states were computed in
    batch = _padded_batch(plain, [9, 2, 14, 5, 0, 11])
    _assert_close(_step(plain, batch), _step(cached, batch))
    first = set(cached.replay_picks)
    assert len(first) == 3 and cache.num_records == len(rows) + 3  # and the replay batch's records, once each
    # the same batch again at the same step: the step's next micro-batch, its rows from the cache and its replay
    # draw its own (gradient accumulation), the records it shares with the first draw not cached twice
    _assert_close(_step(plain, batch), _step(cached, batch))
    assert plain.replay_picks == cached.replay_picks and set(cached.replay_picks) != first
    assert cache.num_records == len(rows) + len(first | set(cached.replay_picks))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_and_autograd_stops_at_the_first_trained_layer(
    reentrant, gap_dataset, rows, tmp_path
):
    """enable_input_require_grads makes the embeddings require grad; the cached path still starts autograd at the
    first trained layer: its input is a leaf (a graph in the plain path)."""
    _, tok = gap_dataset
    torch.manual_seed(0)
    base, targets = _llama(tok)
    trainers = [_trainer(copy.deepcopy(base), tok, rows, tmp_path, targets, cached) for cached in (False, True)]
    inputs = []
    for trainer in trainers:
        unwrap(trainer.model).activation_checkpointing_enable({"use_reentrant": reentrant})
        trainer.model.enable_input_require_grads()

        def grab(module, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])

        looped_layers(trainer.model)[FIRST_TRAINED].register_forward_pre_hook(grab, with_kwargs=True)
    batch = _padded_batch(trainers[0], [3, 7, 1, 12])
    plain = _step(trainers[0], batch)
    cached = _step(trainers[1], batch)
    _assert_close(plain, cached)
    first_plain, first_cached = inputs[0], inputs[-1]
    assert first_plain.grad_fn is not None  # the plain path's graph reaches down through the frozen layers
    assert first_cached.grad_fn is None and first_cached.requires_grad  # a leaf: nothing below it to go back to


def test_the_lower_layers_run_once_per_record_across_epochs(gap_dataset, rows, tmp_path):
    _, tok = gap_dataset
    torch.manual_seed(0)
    counts = {}

    def counted(trainer, index):
        layer = looped_layers(trainer.model)[index]
        forward = layer.forward

        def run(hidden_states, *args, **kwargs):
            counts[index] = counts.get(index, 0) + hidden_states.shape[0]
            return forward(hidden_states, *args, **kwargs)

        layer.forward = run

    records, _ = gap_dataset
    held_out = datasets.Dataset.from_list(list(records)[16:20])
    base, targets = _llama(tok)
    options = dict(
        num_train_epochs=2, loss_weights={"lm": 1.0, "rr_distill": 1.0}, probe_layer=FIRST_TRAINED,
        eval_strategy="epoch", per_device_eval_batch_size=4,
    )  # fmt: skip
    trainer = _trainer(base, tok, rows, tmp_path, targets, True, eval_rows=held_out, **options)
    for index in (0, FIRST_TRAINED - 1, FIRST_TRAINED):
        counted(trainer, index)
    trainer.train()
    assert trainer.state.global_step == 8  # 2 epochs of 4 batches
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2
    # each record's lower layers ran once, the held-out ones at the first evaluation; the trained layers ran
    # every step and every evaluation, twice (tuned and adapters off)
    n = len(rows) + len(held_out)
    assert counts[0] == counts[FIRST_TRAINED - 1] == n
    assert counts[FIRST_TRAINED] == 2 * 2 * n
    assert trainer.prefix_cache.computed == trainer.prefix_cache.num_records == n


def _refusal(build, message, tmp_path, gap_dataset, rows, **options):
    _, tok = gap_dataset
    model, targets, lora = build(tok)
    args = GapSFTConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", prefix_cache=True, **options
    )
    with pytest.raises(ValueError, match=message):
        GapSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda tok: (*_llama(tok), LoraConfig(r=4, target_modules=["q_proj"])), "layer 0 trains"),
        (lambda tok: (*_gpt2(tok, dropout=0.1), _lora(["c_attn"])), r"dropout below layer 2.*transformer\.drop"),
        (
            lambda tok: (
                *_llama(tok),
                LoraConfig(
                    r=4, target_modules=["q_proj"], layers_to_transform=[2, 3], modules_to_save=["embed_tokens"]
                ),
            ),
            "embed_tokens.*requires grad",
        ),
    ],
    ids=["lora-on-layer-0", "dropout-below", "trained-embeddings"],
)
def test_a_model_without_a_frozen_deterministic_prefix_is_refused_by_name(build, message, gap_dataset, rows, tmp_path):
    _refusal(build, message, tmp_path, gap_dataset, rows)


def test_a_looped_model_an_unknown_family_and_compiling_are_refused_by_name(gap_dataset, tmp_path):
    _, tok = gap_dataset
    args = GapSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, prefix_cache=True)
    with pytest.raises(ValueError, match="OuroConfig is a looped model"):
        args.check_against_model(tiny_config(vocab_size=len(tok)))
    with pytest.raises(ValueError, match=r"MistralConfig \(model_type 'mistral'\)"):
        args.check_against_model(MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4))
    with pytest.raises(ValueError, match="prefix_cache"):
        GapSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, prefix_cache=True, torch_compile=True)


def test_a_left_padded_batch_is_refused(gap_dataset, tmp_path):
    _, tok = gap_dataset
    torch.manual_seed(0)
    model, targets = _llama(tok)
    model = get_peft_model(model, _lora(targets))
    cache = PrefixCache(model)
    ids = torch.tensor([[0, 5, 6, 7], [4, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"right-padded.*row\(s\) \[0\]"):
        cache.fill(model, ids, mask)


def test_the_benchmark_runs_both_paths_on_a_tiny_model():
    """benchmarks/prefix_cache.py (figures in docs/performance.md) runs and prints both cases; nothing is timed."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(root / "benchmarks" / "prefix_cache.py"), "--tiny", "--batch", "4", "--steps", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["plain", "prefix cache", "summary"]
    assert rows[1]["cache_records"] == 8 and rows[1]["cache_first_layer"] == 2  # (1 warm-up + 1 timed) x batch 4
    assert all(r["seconds_per_step"] > 0 for r in rows[:2]) and rows[2]["speedup"] > 0


def test_one_dropout_finder_serves_both_caches():
    """prefix_cache and base_cache ask the same question (does anything here sample anew each step?): modules'
    nn.Dropout, attention modules' attention_dropout, and with a config its dropout fields."""
    from types import SimpleNamespace

    from torch import nn

    from loopalign.prefix_cache import active_dropouts

    attn = nn.Module()
    attn.attention_dropout = 0.1
    modules = [("a.drop", nn.Dropout(0.2)), ("a.off", nn.Dropout(0.0)), ("a.attn", attn), ("a.lin", nn.Linear(2, 2))]
    assert active_dropouts(modules) == ["a.drop (p=0.2)", "a.attn.attention_dropout=0.1"]
    assert active_dropouts([], SimpleNamespace(resid_pdrop=0.1, attention_dropout=0.0)) == ["config.resid_pdrop=0.1"]
    assert active_dropouts([("a.off", nn.Dropout(0.0))], SimpleNamespace(hidden_dropout=None)) == []
