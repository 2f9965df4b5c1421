"""[#29 item 4] Norm-matched strengths in training: injection_spec with site norms scales each injected row to
strength x the residual-stream norm at its site (the evaluation's code path), the SFT and GRPO trainers measure
the norms once on the untrained model and inject with them, and grpo_introspection's --norm_matched reaches the
trainer config and the before/after evaluation."""

import pytest
import torch


@pytest.fixture
def fresh_model(tok):
    from loopalign import OuroForCausalLM, tiny_config

    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok)))


def _rows(tok, vectors, **kw):
    """Concept, control and random rows at layer 1, loops 3 / 2 (4-loop model), with the site's num_loops."""
    from loopalign.trainers import introspection_dataset
    from loopalign.trainers.introspection.data import with_num_loops

    kw = {"layers": [1], "injection_loops": [2, 3], "strengths": (0.5, 2.0), "n_rows": 8,
          "control_fraction": 0.25, "random_fraction": 0.25, **kw}  # fmt: skip
    return with_num_loops(introspection_dataset(tok, vectors, **kw), 4)


def test_injection_spec_with_site_norms_is_norm_matched_and_names_a_missing_site(tiny, tok):
    from loopalign.injection import injection_spec, trial_vectors
    from loopalign.trainers.introspection.data import training_site_norms

    model, vectors = tiny
    H = model.config.hidden_size
    ds = _rows(tok, vectors)
    rows = list(ds)
    norms = training_site_norms(model, tok, ds)
    assert set(norms) == {(4, 2, 1), (4, 3, 1)} and all(v > 0 for v in norms.values())
    spec = injection_spec(rows, vectors, H, norms)
    vec = spec["injection_vector"]
    kinds = [r["trial_type"] for r in rows]
    assert {"injection", "control", "random"} <= set(kinds)
    for r, v in zip(rows, vec):
        if r["trial_type"] == "control":
            assert v.abs().max() == 0
            continue
        want = r["strength"] * norms[(4, r["injection_loop"], 1)]
        assert abs(float(v.norm()) - want) < 1e-4 * want, r
        if r["trial_type"] == "injection":
            concept = vectors.vector(r["concept"], r["extraction_loop"], 1).float()
            assert float(torch.nn.functional.cosine_similarity(v, concept, dim=0)) > 1 - 1e-5
    # the evaluation's path gives the same vectors; without norms the strengths are multiples of the vector
    assert torch.equal(vec, trial_vectors(rows, vectors, H, norms))
    plain = injection_spec(rows, vectors, H)["injection_vector"]
    r0 = next(i for i, r in enumerate(rows) if r["trial_type"] == "injection")
    concept = vectors.vector(rows[r0]["concept"], rows[r0]["extraction_loop"], 1).float()
    assert torch.allclose(plain[r0], rows[r0]["strength"] * concept)
    # a site with no norm, a row without num_loops: a ValueError naming the row and what is missing
    named = {**rows[r0], "id": "trial-7"}
    with pytest.raises(ValueError, match=r"trial 'trial-7'.*no residual-stream norm for its site"):
        injection_spec([named], vectors, H, {(4, 0, 0): 1.0})
    bare = {k: v for k, v in rows[r0].items() if k != "num_loops"}
    with pytest.raises(ValueError, match=r"row 1 .*missing \['num_loops'\]"):
        injection_spec([rows[r0], bare], vectors, H, norms)
    control = next(r for r in rows if r["trial_type"] == "control")
    assert injection_spec([control], vectors, H, {})["injection_vector"].abs().max() == 0  # needs no norm


def test_sft_step_injects_strength_times_the_site_norm(fresh_model, tok, tiny, tmp_path, monkeypatch):
    """A real SFT training step with norm_matched: the trainer measured the norms on the untrained model (equal to
    residual_site_norms on the rows' prompts), and in the step's forward the residual after the site layer differs
    from the uninjected one by exactly the row's vector, of norm strength x site norm, from the injection start."""
    import loopalign.trainers.introspection.sft as sft
    from loopalign.hooks import decoder_layers
    from loopalign.injection import inject_rows, residual_site_norms
    from loopalign.trainers import IntrospectionSFTConfig, IntrospectionSFTTrainer, introspection_dataset

    _, vectors = tiny
    ds = introspection_dataset(tok, vectors, layers=[1], injection_loops=[3], strengths=(0.5,), n_rows=4,
                               control_fraction=0.25, random_fraction=0.25, with_targets=True)  # fmt: skip
    ids = tok(ds[0]["prompt"], add_special_tokens=False)["input_ids"]  # every row's prompt (no question rows)
    expected = residual_site_norms(fresh_model, [{**r, "num_loops": 4, "input_ids": ids} for r in ds])
    args = IntrospectionSFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                  learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                  norm_matched=True)  # fmt: skip
    trainer = IntrospectionSFTTrainer(model=fresh_model, args=args, train_dataset=ds, concept_vectors=vectors,
                                      processing_class=tok)  # fmt: skip
    assert trainer.site_norms == pytest.approx(expected) and set(expected) == {(4, 3, 1)}
    site_norm = trainer.site_norms[(4, 3, 1)]

    seen = []

    def spy(model, vecs, loops, layers, starts, *a, **kw):  # the real injection, the site's residual read around it
        layer = decoder_layers(model)[1]
        out = {}

        def grab(name):
            def hook(module, hargs, hkwargs, output):
                if hkwargs.get("loop_index", 0) == 3:
                    out[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()

            return hook

        before = layer.register_forward_hook(grab("plain"), with_kwargs=True)  # runs before the injection's hook
        try:
            with inject_rows(model, vecs, loops, layers, starts, *a, **kw) as recs:
                after = layer.register_forward_hook(grab("injected"), with_kwargs=True)
                try:
                    yield recs
                finally:
                    after.remove()
        finally:
            before.remove()
        seen.append((vecs.clone(), torch.as_tensor(starts).clone(), out))

    monkeypatch.setattr(sft, "inject_rows", __import__("contextlib").contextmanager(spy))
    trainer.train()
    assert len(seen) == 1
    vecs, starts, out = seen[0]
    diff = out["injected"] - out["plain"]  # [B,S,H], right-padded: columns are token indices
    # 2 concept rows and 1 random row at strength 0.5, 1 control (the batch order is the sampler's)
    got = sorted(float(torch.linalg.vector_norm(v)) for v in vecs)
    assert got == pytest.approx([0.0] + [0.5 * site_norm] * 3, abs=1e-4)
    for b in range(vecs.shape[0]):
        s, want = int(starts[b]), float(torch.linalg.vector_norm(vecs[b]))
        assert diff[b, :s].abs().max() == 0
        assert torch.allclose(diff[b, s:], vecs[b].expand(diff.shape[1] - s, -1), atol=1e-5)
        assert torch.allclose(diff[b, s:].norm(dim=-1), torch.full((diff.shape[1] - s,), want), atol=1e-4)


def test_grpo_trainer_measures_norms_once_and_injects_with_them(fresh_model, tok, tiny, tmp_path, monkeypatch):
    import loopalign.trainers.introspection.grpo as grpo
    from loopalign.trainers import IntrospectionGRPOConfig, IntrospectionGRPOTrainer
    from loopalign.trainers.introspection.data import training_site_norms

    _, vectors = tiny
    ds = _rows(tok, vectors, n_rows=4, injection_loops=[3], strengths=(0.5,))
    expected = training_site_norms(fresh_model, tok, ds)
    args = IntrospectionGRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                   num_generations=2, max_completion_length=3, report_to=[], use_cpu=True,
                                   save_strategy="no", norm_matched=True)  # fmt: skip
    trainer = IntrospectionGRPOTrainer(model=fresh_model, args=args, train_dataset=ds.remove_columns("num_loops"),
                                       concept_vectors=vectors, processing_class=tok)  # fmt: skip
    assert trainer.site_norms == pytest.approx(expected)
    specs = []
    real = grpo.injection_spec
    monkeypatch.setattr(grpo, "injection_spec", lambda *a: specs.append((a[0], real(*a))) or specs[-1][1])
    trainer.train()
    assert specs
    for rows, spec in specs:
        for r, v in zip(rows, spec["injection_vector"]):
            want = r["strength"] * expected[(4, 3, 1)] if r["trial_type"] != "control" else 0.0
            assert abs(float(v.norm()) - want) < 1e-4, r["trial_type"]


def test_grpo_introspection_norm_matched_option_reaches_training_and_evaluation():
    from loopalign.scripts import grpo_introspection as r
    from loopalign.trainers.introspection import sft_config_from

    script, train, _ = r.parse_args(["--use_cpu", "true", "--norm_matched", "true"])
    assert train.norm_matched is True and sft_config_from(train).norm_matched is True
    cfg = r.eval_config(script, ["Dust"], 4, train.norm_matched)
    assert cfg.norm_matched is True
    from loopalign.injection import ConceptVectors

    vectors = ConceptVectors({"Dust": torch.zeros(4, 1, 8)}, {"num_loops": 4, "layers": [0], "hidden_size": 8})
    assert r.checks_config(script, train, ["Dust"], vectors, 4).norm_matched is True  # Lindsey's checks too
    _, off, _ = r.parse_args(["--use_cpu", "true", "--norm_matched", "false"])
    assert off.norm_matched is False and r.eval_config(script, ["Dust"], 4, off.norm_matched).norm_matched is False
    help_text = r.IntrospectionGRPOConfig.__dataclass_fields__["norm_matched"].metadata["help"]
    assert "residual-stream norm" in help_text and "training rows and the evaluation" in help_text


def test_lindsey_checks_norm_matched(tiny, tok, monkeypatch):
    """The checks (run beside the before/after evaluation) generate norm-matched too and say so in their table."""
    import loopalign.eval.introspection.checks as checks

    model, vectors = tiny
    seen, real = [], checks.generate_responses
    monkeypatch.setattr(checks, "generate_responses", lambda *a: seen.append(a[-1].norm_matched) or real(*a))
    cfg = checks.ChecksConfig(num_loops=4, extraction_loop=3, injection_loop=3, layer=1, strengths=(0.5,),
                              concepts=("Dust",), n_sentences=1, max_new_tokens=1, norm_matched=True)  # fmt: skip
    res = checks.run_checks(model, tok, vectors, cfg)
    assert seen == [True] and res["config"]["norm_matched"] and "Norm-matched injection" in checks.checks_markdown(res)
    assert "Norm-matched" not in checks.checks_markdown({**res, "config": {**res["config"], "norm_matched": False}})
