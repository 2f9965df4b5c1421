"""Concept injection on plain (non-looped) causal LMs: a model with one loop. The concept vectors are read after
each decoder layer by hooks, the injection runs at loop 0, and both introspection commands run on a saved tiny
Llama and GPT-2 by their folders, with the loop options defaulting to the model's one loop."""

import json

import pytest
import torch


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def plain_folder(request, tok, tiny_causal_lm, tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_causal_lm(request.param, 3)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_concept_vectors_of_a_plain_lm_are_its_residual_stream_differences(plain_folder):
    """Each vector is (the word's residual after layer j at the prompt's last token) minus the baseline words' mean,
    the residual read from ``output_hidden_states`` one word at a time (no padding), so batching, left padding and
    the hook reading are all checked against the model's own outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopalign.injection import extract_concept_vectors
    from loopalign.injection.prompts import concept_prompt_ids

    model = AutoModelForCausalLM.from_pretrained(plain_folder).eval()
    tok = AutoTokenizer.from_pretrained(plain_folder)
    concepts, baseline = ["Dust", "Satellites"], ["apple", "river", "a longer baseline word"]
    vectors = extract_concept_vectors(model, tok, concepts, baseline, layers=[0, 1], batch_size=2)
    assert vectors.num_loops == 1 and vectors.layers == [0, 1]

    def state(word, layer):
        ids = torch.tensor([concept_prompt_ids(tok, word, vectors.metadata["template"])])
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1]

    for layer in (0, 1):
        base = torch.stack([state(w, layer) for w in baseline]).mean(0)
        for word in concepts:
            want = state(word, layer) - base
            got = vectors.vector(word, 0, layer)
            assert torch.allclose(got, want, atol=1e-4), (word, layer, (got - want).abs().max())


def test_injection_at_loop_zero_changes_a_plain_lms_generation(plain_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopalign.injection import inject_rows

    model = AutoModelForCausalLM.from_pretrained(plain_folder).eval()
    tok = AutoTokenizer.from_pretrained(plain_folder)
    ids = tok("Do you detect an injected thought?", return_tensors="pt").input_ids
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(input_ids=ids, **greedy)
    vector = 20 * torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with inject_rows(model, vector, loops=[0], layers=[1], starts=[0]) as (record,):
        injected = model.generate(input_ids=ids, **greedy)
    assert record.calls >= 1 and not torch.equal(plain, injected)
    with pytest.raises(ValueError, match="out of range"):
        with inject_rows(model, vector, loops=[1], layers=[1], starts=[0], num_loops=1):
            pass


def test_other_loop_counts_on_a_plain_lm_fail_naming_the_option(plain_folder, tmp_path):
    """--loop_counts 4 on a plain LM fails after the load, before any vector or trial, naming the option."""
    from loopalign.cli import main

    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"--loop_counts=4: .* is a plain causal LM and runs one loop"):
        main(["eval-introspection", "--model_name_or_path", str(plain_folder), "--device", "cpu", "--loop_counts", "4",
              "--output_dir", str(out)])  # fmt: skip
    assert not out.exists()


def test_resolve_loop_words_reads_the_models_depth():
    from loopalign.eval.introspection import resolve_loop_words

    assert resolve_loop_words("trained", "last", 4) == ("4", "3")
    assert resolve_loop_words("trained", "last", 1) == ("1", "0")
    assert resolve_loop_words("1-8", "last", 4) == ("1-8", "7")
    assert resolve_loop_words("2", "all", 4) == ("2", "all")


@pytest.mark.slow
def test_both_introspection_commands_run_on_a_plain_lm_folder(plain_folder, tmp_path):
    """With their defaults' loop options ('trained', 'last'), a plain LM runs at N = 1 with vectors from loop 0."""
    from loopalign.cli import main

    out = tmp_path / "eval"
    rc = main(["eval-introspection", "--model_name_or_path", str(plain_folder), "--device", "cpu",
               "--n_concepts", "8", "--n_controls", "2", "--n_random", "1", "--n_control_questions", "1",
               "--max_new_tokens", "4", "--batch_size", "16", "--output_dir", str(out)])  # fmt: skip
    assert rc == 0
    saved = json.loads((out / "introspection.json").read_text())
    assert saved["config"]["loop_counts"] == [1] and saved["config"]["extraction_loops"] == [0]
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    injected = [t for t in trials if t["trial_type"] == "injection"]
    assert injected and {(t["num_loops"], t["injection_loop"]) for t in injected} == {(1, 0)}
    assert (out / "checks.md").exists()

    run = tmp_path / "grpo"
    rc = main(["grpo-introspection", "--model_name_or_path", str(plain_folder), "--use_cpu", "true",
               "--max_steps", "1", "--train_rows", "8", "--n_concepts", "8", "--per_device_train_batch_size", "4",
               "--eval_n_controls", "2", "--eval_n_random", "1", "--eval_n_control_questions", "1",
               "--eval_max_new_tokens", "4", "--report_to", "none", "--output_dir", str(run)])  # fmt: skip
    assert rc == 0
    assert "after (N = 1, inj loop 0)" in (run / "compare.md").read_text()
    assert (run / "final" / "config.json").exists()
