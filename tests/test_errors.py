"""What loopalign refuses, it refuses with a LoopalignError of the right kind, still the built-in type it was."""

import fcntl
import threading

import pytest
import torch

from loopalign.errors import ConfigError, DataError, LockError, LockTimeoutError, LoopalignError, ModelError


def _bad_gap_config(tmp_path):
    from loopalign.trainers import GapSFTConfig

    GapSFTConfig(output_dir=str(tmp_path / "o"), distill_kind="sideways")


def _bad_organism_config(tmp_path):
    from loopalign.organism import OrganismConfig

    OrganismConfig(hidden_size=0)


def _bad_readout_config(tmp_path):
    from loopalign.eval.readout import ReadoutConfig

    ReadoutConfig(l2_grid=())


def _bad_record(tmp_path):
    from loopalign.data.schema import validate_record

    validate_record({"id": "r1", "task": "2+2", "answer": "4", "label": 2})


def _unreadable_source(tmp_path):
    from loopalign.data.io import load_build

    load_build(str(tmp_path / "no-build-here"))


def _merged_lora_routed(tmp_path):
    from peft import LoraConfig, get_peft_model

    from loopalign import OuroForCausalLM, tiny_config
    from loopalign.lora import route_lora_by_loop

    model = get_peft_model(OuroForCausalLM(tiny_config(vocab_size=64)), LoraConfig(r=2, target_modules=["q_proj"]))
    model.merge_adapter()
    route_lora_by_loop(model, {1})


def _folder_held_by_another_thread(tmp_path):
    from loopalign.io import folder_lock

    held, release = threading.Event(), threading.Event()

    def holder():
        with folder_lock(tmp_path / "out", "the other writer"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    try:
        with folder_lock(tmp_path / "out", "this writer"):
            pass
    finally:
        release.set()
        t.join()


def _lock_wait_gives_up(tmp_path):
    from loopalign.io import file_lock

    path = tmp_path / "build.lock"
    with open(path, "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with file_lock(path, timeout=0.2, what="a test build", poll=0.05):
            pass


@pytest.mark.parametrize(
    "fail,kind,builtin",
    [
        (_bad_gap_config, ConfigError, ValueError),
        (_bad_organism_config, ConfigError, ValueError),
        (_bad_readout_config, ConfigError, ValueError),
        (_bad_record, DataError, ValueError),
        (_unreadable_source, DataError, RuntimeError),
        (_merged_lora_routed, ModelError, RuntimeError),
        (_folder_held_by_another_thread, LockError, RuntimeError),
        (_lock_wait_gives_up, LockTimeoutError, TimeoutError),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_each_refusal_is_a_loopalign_error_of_its_kind(tmp_path, fail, kind, builtin):
    torch.manual_seed(0)
    with pytest.raises(LoopalignError) as raised:
        fail(tmp_path)
    assert isinstance(raised.value, kind) and isinstance(raised.value, builtin), type(raised.value).__mro__
    assert str(raised.value)  # and it says what


def test_the_kinds_are_distinct():
    kinds = [ConfigError, DataError, ModelError, LockError]
    for a in kinds:
        for b in kinds:
            assert issubclass(a, b) == (a is b), (a, b)
