"""Healing a retrofitted looped model (issue #34 item 2): the base model's next-token distributions distilled into
the looped copy at several loop counts (a tiny random Llama, real PEFT LoRA)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopalign.errors import ConfigError
from loopalign.models.retrofit import RetrofitConfig, retrofit_recurrence
from loopalign.trainers.healing import HealingConfig, heal_looped, loop_kl


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_healing_brings_every_supervised_loop_closer_to_the_base_model(caplog):
    base = _llama()
    spec = RetrofitConfig(prelude=(0, 2), recurrent=(2, 4), coda=(4, 6), adapter_init="sum", init_scale=0.0)
    looped = retrofit_recurrence(base, spec)
    g = torch.Generator().manual_seed(1)
    sequences = [
        torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(6, 12, (16,), generator=g)
    ]
    before = loop_kl(looped, base, sequences, (1, 2, 3), pad_token_id=0)
    assert before[1] < 1e-6 < before[2] and before[3] > 1e-6  # one loop is the base model; more loops drift
    with caplog.at_level("INFO", logger="loopalign.trainers.healing"):
        healed, result = heal_looped(looped, base, sequences, HealingConfig(loops=(2, 3), steps=30,
                                     learning_rate=1e-2, batch_size=8), pad_token_id=0)  # fmt: skip
    # a long CPU run says where it is: the KL before, every tenth step's, the KL after
    steps_logged = [m for m in caplog.messages if m.startswith("healing step")]
    assert [m.split()[2] for m in steps_logged] == ["10/30:", "20/30:", "30/30:"]
    assert "before healing" in caplog.messages[0] and "after healing" in caplog.messages[-1]
    assert result.kl_before == pytest.approx({2: before[2], 3: before[3]})
    for t in (2, 3):
        assert result.kl_after[t] < 0.8 * result.kl_before[t], result
    assert result.trainable_parameters > 0 and result.steps == 30 and result.seconds > 0
    after = loop_kl(healed, base, sequences, (2, 3), pad_token_id=0)
    assert after == pytest.approx(result.kl_after)
    # report_loops: the KL measured at other loop counts than the supervised ones (here one loop too), before and after
    _, wider = heal_looped(retrofit_recurrence(base, spec), base, sequences, HealingConfig(loops=(2,), steps=1),
                           pad_token_id=0, report_loops=(1, 2, 3))  # fmt: skip
    assert wider.kl_before == pytest.approx(before) and set(wider.kl_after) == {1, 2, 3}
    # only LoRA on the recurrent block and the adapter were trained: the base and the prelude are untouched
    trained = {n for n, p in healed.named_parameters() if p.requires_grad}
    assert trained and all("core_block" in n or "adapter" in n for n in trained), sorted(trained)[:5]
    for name, value in (("loops", (0, 2)), ("steps", 0), ("learning_rate", 0.0)):
        with pytest.raises(ConfigError, match="HealingConfig"):
            HealingConfig(**{name: value})
