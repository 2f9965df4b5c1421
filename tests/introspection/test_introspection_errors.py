"""Bad specs fail with clear errors."""

import datasets
import pytest

from loopalign.eval.introspection import IntrospectionConfig, build_eval_trials, transcript_prompt


def _row(tok, **kw):
    _, ids, start = transcript_prompt(tok)
    row = {"prompt": "p", "injection_start": start, "prompt_length": len(ids), "trial_type": "injection",
           "injected": True, "concept": "Dust", "extraction_loop": 3, "injection_loop": 3, "layer": 1, "strength": 4.0}  # fmt: skip
    row.update(kw)
    return row


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer": 2}, "layer 2 out of range: the model has 2 layers"),
        ({"injection_loop": 4}, "injection loop 4 out of range: the model runs 4 loops"),
        ({"extraction_loop": 7}, "extraction loop 7 out of range"),
        ({"concept": "Zeppelins"}, "no concept vector for 'Zeppelins'"),
        ({"injection_start": 10_000}, "injection_start"),
    ],
)
def test_bad_rows_fail_at_trainer_construction(tiny, tok, tmp_path, change, message):
    from loopalign.trainers import IntrospectionGRPOConfig, IntrospectionGRPOTrainer

    model, vectors = tiny
    ds = datasets.Dataset.from_list([_row(tok), _row(tok, **change)])
    args = IntrospectionGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_generations=2,
                                   per_device_train_batch_size=2)  # fmt: skip
    with pytest.raises(ValueError, match=message):
        IntrospectionGRPOTrainer(
            model=model, args=args, train_dataset=ds, concept_vectors=vectors, processing_class=tok
        )


def test_missing_columns_and_vectors(tiny, tok, tmp_path):
    from loopalign.trainers import IntrospectionGRPOConfig, IntrospectionGRPOTrainer

    model, vectors = tiny
    args = IntrospectionGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_generations=2,
                                   per_device_train_batch_size=2)  # fmt: skip
    ds = datasets.Dataset.from_list([{"prompt": "hi", "concept": "Dust"}])
    with pytest.raises(ValueError, match="lacks column"):
        IntrospectionGRPOTrainer(
            model=model, args=args, train_dataset=ds, concept_vectors=vectors, processing_class=tok
        )
    with pytest.raises(ValueError, match="needs concept_vectors"):
        IntrospectionGRPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    with pytest.raises(FileNotFoundError):
        IntrospectionGRPOTrainer(
            model=model, args=args, train_dataset=ds, concept_vectors=str(tmp_path / "none.st"), processing_class=tok
        )


def test_config_errors(tiny, tok, tmp_path):
    from loopalign.trainers import IntrospectionGRPOConfig

    model, vectors = tiny
    with pytest.raises(ValueError, match="unknown reward"):
        IntrospectionGRPOConfig(output_dir=str(tmp_path), use_cpu=True, introspection_rewards='{"vibes": 1}')
    with pytest.raises(ValueError, match="not valid JSON"):
        IntrospectionGRPOConfig(output_dir=str(tmp_path), use_cpu=True, introspection_rewards="{detection")
    cases = [
        (dict(layers=(3,)), "out of range: the model has 2 layers"),
        (dict(injection_loops=(5,), loop_counts=(4,)), "injection loop"),
        (dict(extraction_loops=(4,), loop_counts=(6,)), "vectors cover loops 0..3"),
        (dict(concepts=("Zeppelins",)), "no concept vector"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            build_eval_trials(tok, vectors, IntrospectionConfig(**kw), model.config)
    with pytest.raises(ValueError, match="strengths"):
        IntrospectionConfig(strengths=(0.0,))
    with pytest.raises(ValueError, match="loop_counts"):
        IntrospectionConfig(loop_counts="0-2")
    assert IntrospectionConfig(loop_counts="1-3", injection_loops="0,2").loop_counts == (1, 2, 3)
