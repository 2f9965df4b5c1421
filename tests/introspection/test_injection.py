"""The injection changes exactly the chosen loop, layer and positions; the GRPO trainer applies it at the
right (left-padded) columns in generation and in the log-prob recomputation."""

import datasets
import pytest
import torch

from loopalign.eval.introspection import inject_rows, transcript_prompt
from loopalign.hooks import add_vector
from loopalign.injection import injection_spec


def _states(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, num_loops=4, output_layer_states=True, use_cache=False)
    return out.layer_hidden_states  # T x L x [B,S,H]


def test_inject_rows_changes_exactly_the_site_and_columns(tiny):
    model, _ = tiny
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (3, 12))
    H = model.config.hidden_size
    vec = torch.randn(3, H)
    vec[2] = 0  # a control row
    loops, layers, starts = [2, 2, -1], [1, 1, -1], [5, 8, 0]
    base = _states(model, ids)
    with inject_rows(model, vec, loops, layers, starts) as recs:
        hit = _states(model, ids)
    assert len(recs) == 1 and recs[0].calls == 1
    for t in range(4):
        for j in range(2):
            diff = (hit[t][j] - base[t][j]).abs().amax(-1)  # [B,S]
            if (t, j) < (2, 1):  # everything computed before the site is untouched
                assert diff.max() == 0, (t, j)
    d = hit[2][1] - base[2][1]
    assert torch.allclose(d[0, 5:], vec[0].expand(7, -1), atol=1e-5) and d[0, :5].abs().max() == 0
    assert torch.allclose(d[1, 8:], vec[1].expand(4, -1), atol=1e-5) and d[1, :8].abs().max() == 0
    assert d[2].abs().max() == 0 and all(torch.equal(hit[t][j][2], base[t][j][2]) for t in range(4) for j in range(2))
    # later loops see the change (causally: only at and after the start column)
    later = (hit[3][0] - base[3][0]).abs().amax(-1)
    assert later[0, :5].max() == 0 and later[0, 5:].max() > 0


def test_mixed_sites_in_one_batch(tiny):
    model, _ = tiny
    ids = torch.randint(3, 500, (2, 10))
    vec = torch.randn(2, model.config.hidden_size)
    base = _states(model, ids)
    with inject_rows(model, vec, [0, 3], [0, 1], [2, 4]) as recs:
        hit = _states(model, ids)
    assert len(recs) == 2
    assert torch.allclose((hit[0][0] - base[0][0])[0, 2:], vec[0].expand(8, -1), atol=1e-5)
    assert (hit[0][0] - base[0][0])[1].abs().max() == 0
    assert torch.allclose((hit[3][1] - base[3][1])[1, 4:], vec[1].expand(6, -1), atol=1e-5)
    assert (hit[2][1] - base[2][1])[1].abs().max() == 0


def test_injection_reaches_generated_tokens(tiny, tok):
    model, vectors = tiny
    _, ids, start = transcript_prompt(tok)
    x = torch.tensor([ids])
    v = 8 * vectors.vector("Dust", 3, 1)[None]
    with inject_rows(model, v, [3], [1], [start]) as recs:
        out = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, num_loops=4)
    plain = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, num_loops=4)
    assert recs[0].calls == 4  # the prompt forward plus one per further generated token
    assert not torch.equal(out, plain)


def test_inject_rows_rejects_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="one loop/layer/start per row"):
        with inject_rows(model, torch.zeros(2, model.config.hidden_size), [0], [0], [0]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with inject_rows(model, torch.ones(1, model.config.hidden_size), [4], [0], [0], num_loops=4):
            pass
    with pytest.raises(ValueError, match="layer index 5 is out of range"):
        with inject_rows(model, torch.ones(1, model.config.hidden_size), [0], [5], [0]):
            pass


def _trainer(model, tok, vectors, rows, tmp_path, **kw):
    from loopalign.trainers import IntrospectionGRPOConfig, IntrospectionGRPOTrainer

    args = IntrospectionGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
        report_to=[], use_cpu=True, save_strategy="no", **kw,
    )  # fmt: skip
    return IntrospectionGRPOTrainer(
        model=model, args=args, train_dataset=rows, concept_vectors=vectors, processing_class=tok
    )


def test_trainer_logps_and_generation_use_the_row_columns(tiny, tok, tmp_path):
    """Left-padded rows of different prompt lengths: the trainer's injected log-probs and greedy rollouts equal
    per-row unpadded runs with add_vector at the row's injection start."""
    from loopalign import OuroForCausalLM, tiny_config

    _, vectors = tiny
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval()
    prompt, ids, start = transcript_prompt(tok)
    short_prompt = prompt.replace("I am an interpretability researcher", "I am a researcher")
    short_ids = tok(short_prompt, add_special_tokens=False)["input_ids"]
    short_start = start - (len(ids) - len(short_ids))
    rows = datasets.Dataset.from_list([
        {"prompt": prompt, "injection_start": start, "prompt_length": len(ids), "trial_type": "injection",
         "injected": True, "concept": "Dust", "extraction_loop": 3, "injection_loop": 3, "layer": 1, "strength": 8.0},
        {"prompt": short_prompt, "injection_start": short_start, "prompt_length": len(short_ids),
         "trial_type": "injection", "injected": True, "concept": "Satellites", "extraction_loop": 2,
         "injection_loop": 1, "layer": 0, "strength": 8.0},
        {"prompt": short_prompt, "injection_start": short_start, "prompt_length": len(short_ids),
         "trial_type": "control", "injected": False, "concept": "", "extraction_loop": -1, "injection_loop": -1,
         "layer": -1, "strength": 0.0},
    ])  # fmt: skip
    trainer = _trainer(model, tok, vectors, rows, tmp_path, generation_kwargs={"do_sample": False})
    model = trainer.model
    rows_l = [rows[i] for i in range(3)]
    spec = injection_spec(rows_l, trainer.concept_vectors, model.config.hidden_size)
    seqs = [ids, short_ids, short_ids]
    comp = [[5, 6, 7], [8, 9, 10], [8, 9, 10]]
    P, C = max(map(len, seqs)), 3
    input_ids = torch.zeros(3, P + C, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, (s, c) in enumerate(zip(seqs, comp)):
        input_ids[i, P - len(s) : P] = torch.tensor(s)
        input_ids[i, P:] = torch.tensor(c)
        mask[i, P - len(s) :] = 1
    trainer._active_spec = spec
    try:
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, mask, C, batch_size=2)
        gen, _ = trainer._generate_single_turn(seqs, None, {}, 1)
    finally:
        trainer._active_spec = None
    sites = [(3, 1, start), (1, 0, short_start), None]
    for i, (s, c) in enumerate(zip(seqs, comp)):
        x = torch.tensor([s + c])
        ctx = (
            add_vector(model, spec["injection_vector"][i], sites[i][0], sites[i][1], start=sites[i][2])
            if sites[i]
            else None
        )
        with torch.no_grad(), ctx if ctx else torch.enable_grad():
            ref = model(input_ids=x).logits[0, len(s) - 1 : -1].log_softmax(-1)
            greedy = model.generate(input_ids=torch.tensor([s]), max_new_tokens=4, do_sample=False)
        want = ref.gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(logps[i], want, atol=1e-4), i
        assert gen[i] == greedy[0, len(s) :].tolist(), i
    # without the spec nothing is injected: row 0 log-probs change
    plain, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, mask, C)
    assert not torch.allclose(plain[0], logps[0], atol=1e-4)
    assert torch.allclose(plain[2], logps[2], atol=1e-5)
