import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _library_messages_on_stdout():
    """loopalign's messages on standard output in every test, as the commands show them (``enable_console``), so
    a test that reads them sees the same whether or not a command ran in this process before it."""
    from loopalign.log import enable_console

    enable_console()


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script("real_cure_table")``: a script of benchmarks/ as a module (the scripts are not a package,
    so the tests that call their functions load them from their file)."""
    import importlib.util

    folder = Path(__file__).resolve().parent.parent / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


#: the full shipped GSM8K and XSTest files (the project's copy of ../shared/data, gzipped): gsm8k/
#: (example_model_solutions.jsonl, test.jsonl) and xstest/ (model_completions/, xstest_prompts.csv)
FULL_DATA = FIXTURES / "data" / "full" / "gsm8k_xstest.tar.gz"


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """The full GSM8K / XSTest files, unpacked from the repository's fixture (any clone has them)."""
    import tarfile

    out = tmp_path_factory.mktemp("shared-data")
    with tarfile.open(FULL_DATA) as tar:
        members = tar.getmembers()
        assert all(not m.name.startswith(("/", "..")) and (m.isfile() or m.isdir()) for m in members)
        tar.extractall(out, members=members)  # noqa: S202 (our own archive, checked above)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory():
    from loopalign import OuroForCausalLM, tiny_config

    def make(**overrides):
        torch.manual_seed(0)
        return OuroForCausalLM(tiny_config(**overrides)).eval()

    return make


def pytest_collection_modifyitems(config, items):
    """Tests that need the default model organism run last (stable order otherwise), so that its
    build, which CI starts beside the tests (.ci/run), overlaps everything else."""
    items.sort(key=lambda item: "organism" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The shipped data fixtures (tests/fixtures/data)."""
    return FIXTURES / "data"


@pytest.fixture(scope="session")
def tok():
    """The project's local tokenizer."""
    from loopalign.tokenizer import local_tokenizer

    return local_tokenizer()


@pytest.fixture(scope="session")
def tiny_ouro(tok):
    """A random tiny Ouro over the local tokenizer, in eval mode."""
    from loopalign.models.ouro import OuroForCausalLM, tiny_config

    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval()


@pytest.fixture(autouse=True)
def _single_thread_for_data_tests(request):
    """The data tests run tiny models, fastest on one thread (and still fast when other processes share the
    cores); other tests keep the thread count they are given."""
    if request.node.path.parent.name not in ("data", "data_builders"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_causal_lm(tok):
    """``make(kind, layers)``: a tiny random plain causal LM over the local tokenizer, ``kind`` "llama" (hidden 32,
    4 heads, 2 KV heads) or "gpt2" (hidden 32, 4 heads). The caller seeds torch first."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    def make(kind: str = "llama", layers: int = 2):
        if kind == "llama":
            return LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=len(tok),
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=layers,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )  # fmt: skip
            )
        if kind == "gpt2":
            return GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=len(tok),
                    n_embd=32,
                    n_layer=layers,
                    n_head=4,
                    n_positions=512,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.bos_token_id,
                )  # fmt: skip
            )
        raise ValueError(f"tiny_causal_lm: unknown kind {kind!r}")

    return make


@pytest.fixture(scope="session")
def llama_folder(tok, tiny_causal_lm, tmp_path_factory):
    """A saved tiny random Llama (2 layers, hidden 32) with the local tokenizer: a plain causal LM by folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    tiny_causal_lm("llama", 2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _bf16_flash_attention_fails() -> bool:
    """True when torch's CPU flash attention cannot run in bf16 on the kernel path in use.

    Forcing a kernel path below the hardware's (``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine, as CI's AVX2
    part does) makes torch 2.13's bf16 flash-attention kernel raise "pack_vnni2 is only supported when avx512 is
    supported": it dispatches the AVX2 kernel but packs for the AVX-512 BF16 hardware it detects. A CPU that really
    has AVX2 only never takes that packing branch.
    """
    q = torch.randn(1, 1, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError as err:
        if "pack_vnni2" in str(err):
            return True
        raise
    return False


@pytest.fixture
def bf16_attention():
    """bf16 tests run on torch's flash attention; where a forced lower kernel path breaks it (see above), on the
    math backend instead, so they still check bf16 training on that path rather than being skipped."""
    if not _bf16_flash_attention_fails():
        yield "flash"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield "math"
