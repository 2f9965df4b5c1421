"""A trained run's adapters reload exactly, loop routing included (issue [artifacts])."""

import json
import logging
import re

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from loopalign import OuroForCausalLM, tiny_config
from loopalign.trainers import GapSFTConfig, GapSFTTrainer, load_gap_model, write_adapter_card
from loopalign.trainers.adapter_card import base_model_kind


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
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
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
    from loopalign.loading import load_model

    via_eval, _ = load_model(str(root / "final"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(via_eval(input_ids=ids, num_loops=4).logits, logits, atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a gap-SFT adapter folder"):
        load_gap_model(root / "base")


def _snippets(card: str, folder) -> list[str]:
    return [
        block.replace("PATH/TO/THIS/FOLDER", str(folder)) for block in re.findall(r"```python\n(.*?)```", card, re.S)
    ]


def test_the_adapter_card_loads_with_each_of_its_snippets(trained):
    """The card (huggingface_hub's ModelCard) says what the run is, and each of its three snippets, run as written,
    gives a model: load_gap_model with the routing, PeftModel and AutoPeftModelForCausalLM without it."""
    root, ids, logits, _ = trained
    path = write_adapter_card(
        root / "final", "**SV caught up: yes**", training={"learning_rate": 0.05, "seed": 0}, dataset="synthetic"
    )
    card = ModelCard.load(path)
    assert card.data.library_name == "peft" and "loopalign" in card.data.tags
    assert card.data.base_model is None  # a local folder is no Hub id: the hub's base_model field stays empty
    text = card.text
    assert f"the local folder `{root / 'base'}`" in text and "`>=2`" in text and "a different model" in text
    assert "SV caught up: yes" in text and "- learning_rate: 0.05" in text and "- dataset: `synthetic`" in text
    assert "transformers " in text and "peft " in text  # the versions
    snippets = _snippets(text, root / "final")
    assert len(snippets) == 3 and "load_gap_model" in snippets[0] and "AutoPeftModelForCausalLM" in snippets[2]
    outputs = []
    for code in snippets:
        scope: dict = {}
        exec(code, scope)  # noqa: S102  (the card's own snippets, as a user would paste them)
        with torch.no_grad():
            outputs.append(scope["model"].eval()(input_ids=ids, num_loops=4).logits)
    torch.testing.assert_close(outputs[0], logits, atol=1e-5, rtol=0)  # with the routing: the trained model
    torch.testing.assert_close(outputs[1], outputs[2], atol=1e-5, rtol=0)  # PEFT's two loaders: one model
    assert (outputs[1] - logits).abs().max() > 1e-3  # without the routing, as the card says


@pytest.mark.parametrize(
    "base, kind, auto",
    [("smollm2-135m", "loopalign", False), ("organism", "loopalign", False), ("ByteDance/Ouro-1.4B", "hub", True)],
)
def test_the_card_names_a_hub_base_and_says_why_auto_peft_cannot_load_a_loopalign_one(
    trained, tmp_path, base, kind, auto
):
    import shutil

    folder = tmp_path / "final"
    shutil.copytree(trained[0] / "final", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    assert base_model_kind(base) == kind
    card = ModelCard.load(write_adapter_card(folder))
    assert card.data.base_model == (base if kind == "hub" else None)
    assert ("AutoPeftModelForCausalLM.from_pretrained" in card.text) == auto
    assert ("cannot load these adapters" in card.text) == (not auto)
    if not auto:
        assert f"load_model({base!r})[0]" in card.text


def test_a_build_left_in_the_output_folder_is_reused_only_with_the_same_settings(tmp_path, caplog, fixtures_dir):
    """A second run in the same output folder must not train on the first run's data."""
    from loopalign.data.load import DatasetRequest, load_dataset
    from loopalign.tokenizer import local_tokenizer

    tok = local_tokenizer()
    out = str(tmp_path / "data")
    gsm8k = f"gsm8k-solutions:{fixtures_dir / 'data' / 'gsm8k' / 'example_model_solutions.jsonl'}"
    xstest = f"xstest-completions:{fixtures_dir / 'data' / 'xstest' / 'model_completions'}"
    caplog.set_level(logging.INFO, logger="loopalign")  # what the library says goes through its logger
    first = load_dataset(DatasetRequest(gsm8k, build_dir=out), tok)[0]
    again = load_dataset(DatasetRequest(gsm8k, build_dir=out), tok)[0]
    assert "reusing the verification build" in caplog.text and again["id"] == first["id"]
    caplog.clear()
    other = load_dataset(DatasetRequest(xstest, build_dir=out), tok)[0]
    printed = caplog.text
    assert "rebuilding" in printed and "source: 'gsm8k-solutions' -> 'xstest-completions'" in printed
    assert not set(other["id"]) & set(first["id"]) and set(other["source"]) == {"xstest-completions"}


def test_short_console_logs_keep_the_objective_and_the_deepest_sv():
    from loopalign.trainers.console import short_logs

    logs = {"loss": 1.0, "lm_loss": 0.9, "learning_rate": 1e-3, "epoch": 0.5}
    logs |= {f"{k}/loop_{t}": 0.5 for k in ("loss", "sv", "probe_acc", "replay") for t in range(1, 5)}
    short = short_logs(logs, num_loops=4)
    assert set(short) == {"loss", "lm_loss", "learning_rate", "epoch", "sv/loop_4", "probe_acc/loop_4"}
