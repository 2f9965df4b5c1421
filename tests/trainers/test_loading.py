"""A trained run's adapters reload exactly, loop routing included (issue [artifacts])."""

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from loopalign import OuroForCausalLM, tiny_config
from loopalign.eval import load_model_and_tokenizer
from loopalign.trainers import GapSFTConfig, GapSFTTrainer, load_gap_model, write_adapter_card


@pytest.fixture(scope="module")
def trained(gap_dataset, tmp_path_factory):
    ds, tok = gap_dataset
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    OuroForCausalLM(tiny_config(vocab_size=len(tok))).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    args = GapSFTConfig(
        output_dir=str(root / "out"), max_steps=3, per_device_train_batch_size=8, learning_rate=5e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, lora_loops=">=2",
    )  # fmt: skip
    trainer = GapSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(root / "base"),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    trainer.train()
    trainer.save_model(str(root / "final"))
    ids = torch.tensor([ds[0]["input_ids"]])
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, num_loops=4).logits
    return root, ids, logits, tok


def test_load_gap_model_gives_the_trained_model_and_a_plain_peft_load_does_not(trained):
    root, ids, logits, _ = trained
    model, tok = load_gap_model(root / "final", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, num_loops=4).logits, logits, atol=1e-5, rtol=0)
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "final").eval()
        assert (plain(input_ids=ids, num_loops=4).logits - logits).abs().max() > 1e-3  # routing lost
    assert len(tok) == len(trained[3])
    # eval_gap's loader (``--model final/``) goes through it too
    via_eval, _ = load_model_and_tokenizer(str(root / "final"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(via_eval(input_ids=ids, num_loops=4).logits, logits, atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a gap-SFT adapter folder"):
        load_gap_model(root / "base")


def test_the_adapter_card_says_how_to_load_it(trained):
    root = trained[0]
    card = open(write_adapter_card(root / "final", "**SV caught up: yes**")).read()
    assert "load_gap_model" in card and "`>=2`" in card and "a different model" in card
    assert "SV caught up: yes" in card and f"base_model: {root / 'base'}" in card


def test_a_build_left_in_the_output_folder_is_reused_only_with_the_same_settings(tmp_path, capsys, fixtures_dir):
    """A second run in the same output folder must not train on the first run's data."""
    from loopalign.tokenizer import local_tokenizer
    from loopalign.trainers.gap_data import load_verification_dataset

    tok = local_tokenizer()
    out = str(tmp_path / "data")
    gsm8k = f"gsm8k-solutions:{fixtures_dir / 'data' / 'gsm8k' / 'example_model_solutions.jsonl'}"
    xstest = f"xstest-completions:{fixtures_dir / 'data' / 'xstest' / 'model_completions'}"
    first = load_verification_dataset(gsm8k, tok, "local", out)
    again = load_verification_dataset(gsm8k, tok, "local", out)
    assert "reusing the verification build" in capsys.readouterr().out and again["id"] == first["id"]
    other = load_verification_dataset(xstest, tok, "local", out)
    printed = capsys.readouterr().out
    assert "rebuilding" in printed and "source: 'gsm8k-solutions' -> 'xstest-completions'" in printed
    assert not set(other["id"]) & set(first["id"]) and set(other["source"]) == {"xstest-completions"}


def test_short_console_logs_keep_the_objective_and_the_deepest_sv():
    from loopalign.trainers.console import short_logs

    logs = {"loss": 1.0, "lm_loss": 0.9, "learning_rate": 1e-3, "epoch": 0.5}
    logs |= {f"{k}/loop_{t}": 0.5 for k in ("loss", "sv", "probe_acc", "replay") for t in range(1, 5)}
    short = short_logs(logs, num_loops=4)
    assert set(short) == {"loss", "lm_loss", "learning_rate", "epoch", "sv/loop_4", "probe_acc/loop_4"}
