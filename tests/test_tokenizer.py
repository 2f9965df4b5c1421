from loopalign.tokenizer import local_tokenizer


def test_special_tokens_and_chat_template():
    tok = local_tokenizer()
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7+8?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nWhat is 7+8?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and 2 in ids
    assert tok.decode(ids) == text


def test_digits_split_and_round_trip_of_any_text():
    tok = local_tokenizer()
    assert tok.tokenize("2025") == ["2", "0", "2", "5"]
    text = "Unicode ✓ naïve — 3.5%"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_deterministic_and_bounded():
    a, b = local_tokenizer(), local_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 1024
