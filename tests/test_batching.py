"""The one padder (loopalign.batching) and the pad rule."""

import pytest
import torch

from loopalign.batching import pad_left, pad_right, pad_sequences, pad_token_id
from loopalign.tokenizer import local_tokenizer


def test_pad_right_masks_and_labels():
    batch = pad_right([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]


def test_pad_left_puts_every_prompt_at_the_last_column():
    batch = pad_left([[1, 2, 3], [4]], pad_token_id=7)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 7, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_sequences_dtype_length_and_errors():
    out = pad_sequences([[0.5], [1.0, 2.0]], 0.0, dtype=torch.float32, length=3)
    assert out.dtype == torch.float32 and out.tolist() == [[0.5, 0.0, 0.0], [1.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match="shorter than the longest row"):
        pad_sequences([[1, 2, 3]], 0, length=2)
    with pytest.raises(ValueError, match="side"):
        pad_sequences([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="no rows"):
        pad_sequences([], 0)


def test_pad_rule_pad_then_eos():
    tok = local_tokenizer()
    assert pad_token_id(tok) == tok.pad_token_id
    tok.pad_token = None
    assert pad_token_id(tok) == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        pad_token_id(tok)
