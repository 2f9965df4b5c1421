"""base_cache: the frozen base's outputs (rr_distill's features, replay_kind='kl''s hidden states) kept per record and
served from memory, with the same training as running the base forward at every visit (tiny random Ouro, real PEFT
LoRA, real TRL trainer)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from loopalign import OuroForCausalLM, tiny_config
from loopalign.errors import ConfigError
from loopalign.trainers import GapSFTConfig, GapSFTTrainer, self_replay_dataset
from loopalign.trainers.base_cache import BaseOutputCache

_PEFT = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_a_held_batch_is_served_in_any_order_and_padding():
    cache = BaseOutputCache()
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [3, 4, 5, 6]])
    mask = (torch.arange(4)[None] < torch.tensor([3, 2, 4])[:, None]).long()
    feats = torch.randn(2, 3, 8, dtype=torch.bfloat16)  # [T, B, H]
    states = [torch.randn(3, 4, 8), torch.randn(3, 4, 8)]  # T x [B, S, H]
    calls = []
    positions = torch.tensor([2, 1, 3])

    def compute_feats():
        calls.append("f")
        return feats

    def compute_states():
        calls.append("s")
        return states

    assert cache.features(ids, mask, positions, compute_feats) is feats
    assert cache.sequences(ids, mask, compute_states) == states
    # the same records, reordered and padded to another width: served, no forward
    order = [2, 0]
    wide = torch.cat([ids[order], torch.zeros(2, 2, dtype=torch.long)], dim=1)
    wide_mask = torch.cat([mask[order], torch.zeros(2, 2, dtype=torch.long)], dim=1)
    served = cache.features(wide, wide_mask, positions[order], compute_feats)
    assert served.dtype == torch.bfloat16 and torch.equal(served, feats[:, order])
    served_states = cache.sequences(wide, wide_mask, compute_states)
    for t in range(2):
        for b, row in enumerate(order):
            n = int(mask[row].sum())
            assert torch.equal(served_states[t][b, :n], states[t][row, :n])
            assert not served_states[t][b, n:].any()
    assert calls == ["f", "s"] and cache.served == 4 and cache.computed == 6
    # another read position is another key: computed again
    cache.features(ids, mask, positions - torch.tensor([0, 0, 1]), compute_feats)
    assert calls == ["f", "s", "f"]


def _train(gap_dataset, tmp_path, base_cache: bool, **kw):
    ds, tok = gap_dataset
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.sequence_bias = {(end,): 5.0}
    replay = self_replay_dataset(model, tok, ds["task"][:16], num_loops=2, max_new_tokens=6).dataset
    args = GapSFTConfig(
        output_dir=str(tmp_path / f"cache_{base_cache}"),
        max_steps=10,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        num_loops=2,
        replay_batch_size=4,
        loss_weights={"lm": 1.0, "replay": 1.0, "rr_distill": 1.0},
        replay_kind="kl",
        base_cache=base_cache,
        **kw,
    )
    trainer = GapSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_PEFT, replay_dataset=replay
    )
    trainer.train()
    return trainer


def test_training_with_the_cache_is_training_without_it(gap_dataset, tmp_path):
    plain = _train(gap_dataset, tmp_path, base_cache=False)
    cached = _train(gap_dataset, tmp_path, base_cache=True)
    # every training record's features (10 steps x 8 of 48 records: a second epoch) and every replay record's states
    held = cached.base_cache.num_records
    assert plain.base_cache is None and held == 48 + len(cached.replay_features) and cached.base_cache.served > 0
    for name in ("rr_distill_loss", "replay_loss", "loss"):
        a = [e[name] for e in plain.state.log_history if name in e]
        b = [e[name] for e in cached.state.log_history if name in e]
        assert len(a) == 10 and b == pytest.approx(a, rel=1e-4, abs=1e-7)
    assert any(e["replay_loss"] > 1e-6 for e in cached.state.log_history if "replay_loss" in e)  # the terms moved


def test_the_cache_refuses_a_base_with_dropout(gap_dataset, tmp_path):
    ds, tok = gap_dataset
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok), attention_dropout=0.1))
    args = GapSFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        num_loops=2,
        loss_weights={"lm": 1.0, "rr_distill": 1.0},
        base_cache=True,
    )
    with pytest.raises(ConfigError, match="base_cache: the base model has active dropout"):
        GapSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_PEFT)


def test_the_benchmark_runs_both_cases_on_a_tiny_model():
    """benchmarks/base_cache.py (figures in docs/performance.md) runs and prints both cases; nothing is timed."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(root / "benchmarks" / "base_cache.py"), "--tiny", "--batch", "4", "--steps", "1",
            "--replay-records", "4", "--replay-batch", "4"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["plain", "base cache", "summary"]
    assert rows[1]["cache_records"] == 8 + 4  # (1 warm-up + 1 timed) x batch 4 training records, 4 replay records
    assert all(math.isfinite(r["seconds_per_step"]) for r in rows[:2]) and math.isfinite(rows[2]["speedup"])
