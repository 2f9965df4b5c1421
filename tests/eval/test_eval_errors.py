import re

import numpy as np
import pytest
from datasets import Dataset

from loopalign.eval import GapConfig, ReadoutConfig, evaluate_gap, make_splits, prepare_records, verdict_token_ids


def _rows(synthetic_rows, n=8):
    return [dict(r) for r in synthetic_rows[:n]]


def _named(row) -> str:
    return f"record {re.escape(repr(row['id']))}"


def test_missing_label_names_record(synthetic_rows):
    rows = _rows(synthetic_rows)
    rows[3]["label"] = None
    with pytest.raises(ValueError, match=_named(rows[3]) + r".*'label'"):
        prepare_records(Dataset.from_list(rows))
    rows[3]["label"] = 2
    with pytest.raises(ValueError, match=_named(rows[3]) + r".*'label' must be 0 or 1"):
        prepare_records(rows)


def test_probe_position_past_end_names_record(synthetic_rows):
    rows = _rows(synthetic_rows)
    rows[2]["probe_indices"] = [5, len(rows[2]["input_ids"])]
    with pytest.raises(ValueError, match=_named(rows[2]) + r".*'probe_indices'.*past the sequence end"):
        prepare_records(rows)
    rows = _rows(synthetic_rows)
    rows[1]["verdict_index"] = 10_000
    with pytest.raises(ValueError, match=_named(rows[1]) + r".*'verdict_index'"):
        prepare_records(rows)
    rows = _rows(synthetic_rows)
    del rows[0]["input_ids"], rows[0]["prompt"]
    with pytest.raises(ValueError, match=_named(rows[0]) + r".*'input_ids'"):
        prepare_records(rows)


def test_empty_split_and_single_class():
    ids = [f"r{i}" for i in range(4)]
    with pytest.raises(ValueError, match=r"(validation|test) split is empty"):
        make_splits(ids, np.array([1, 0, 1, 0]), ["g0", "g0", "g1", "g1"], ReadoutConfig())
    with pytest.raises(ValueError, match="single class"):
        make_splits(ids, np.array([1, 1, 1, 1]), ids, ReadoutConfig())
    with pytest.raises(ValueError, match=r"record 'r2'.*'label'"):
        make_splits(ids, np.array([1, 0, -1, 0]), ids, ReadoutConfig())


def test_single_class_dataset_end_to_end(tiny_model, tok, synthetic_rows):
    rows = [dict(r, label=1) for r in synthetic_rows[:12]]
    cfg = GapConfig(loops=[1], verdict_tokens=("Yes", "No"), n_boot=10)
    with pytest.raises(ValueError, match="single class"):
        evaluate_gap(tiny_model, tok, Dataset.from_list(rows), config=cfg)


def test_verdict_tokens_must_be_single(tok):
    with pytest.raises(ValueError, match=r"no='Nonetheless' is not a single token"):
        verdict_token_ids(tok, "Yes", "Nonetheless")
    yes, no = verdict_token_ids(tok, "Yes", "No")
    assert yes != no and tok.decode([yes]).strip() == "Yes" and tok.decode([no]).strip() == "No"
    assert verdict_token_ids(tok, 5, 6) == (5, 6)
    with pytest.raises(ValueError, match="same id"):
        verdict_token_ids(tok, 5, 5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="GapConfig.metric"):
        GapConfig(metric="precision")
    with pytest.raises(ValueError, match="loops"):
        GapConfig(loops="0-3")
    with pytest.raises(ValueError, match="ReadoutConfig.fractions"):
        ReadoutConfig(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="ReadoutConfig.position"):
        ReadoutConfig(position="middle")
    assert GapConfig(loops="1-3,6").loops == [1, 2, 3, 6]
