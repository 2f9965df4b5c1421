"""The CPU build fingerprint (loopalign.speed.build_fingerprint) and the organisms' cache keys that hash it: the
same config built on another kernel path (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, threads) is another
model, so it gets another cache folder. Each kernel path is read in a fresh process, as torch reads
ATEN_CPU_CAPABILITY when it starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopalign.organism import OrganismConfig
from loopalign.organism.huginn import huginn_organism_path
from loopalign.organism.introspection import IntrospectionOrganismConfig
from loopalign.speed import build_fingerprint, fingerprint_hash

ROOT = Path(__file__).resolve().parent.parent

_NAMES = """
import json
import torch
from loopalign.organism import OrganismConfig
from loopalign.organism.huginn import huginn_organism_path
from loopalign.speed import build_fingerprint
from loopalign.organism.introspection import IntrospectionOrganismConfig
print(json.dumps({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "fingerprint": build_fingerprint(1),
    "organism": OrganismConfig().folder_name(),
    "huginn": huginn_organism_path(OrganismConfig(), "/c").name,
    "introspection": IntrospectionOrganismConfig().folder_name(),
}))
"""


def _names(**env_overrides) -> dict:
    """The fingerprint and the three organisms' folder names in a fresh process with the environment changed
    by ``env_overrides`` (a None value removes the variable)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name, value in env_overrides.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    done = subprocess.run([sys.executable, "-c", _NAMES], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _here() -> dict:
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "fingerprint": build_fingerprint(1),
        "organism": OrganismConfig().folder_name(),
        "huginn": huginn_organism_path(OrganismConfig(), "/c").name,
        "introspection": IntrospectionOrganismConfig().folder_name(),
    }


def test_the_fingerprint_records_the_kernel_path():
    fp = build_fingerprint(3)
    assert set(fp) == {"torch", "cpu_capability", "mkl", "mkl_instructions", "onednn", "threads"}
    assert fp["torch"] == torch.__version__ and fp["threads"] == 3
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (fp["mkl"] is not None) == torch.backends.mkl.is_available()
    assert (fp["onednn"] is not None) == torch.backends.mkldnn.is_available()
    mkl_setting = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper()
    assert fp["mkl_instructions"] == mkl_setting if mkl_setting else fp["mkl_instructions"].startswith("auto (")
    assert fingerprint_hash(fp) != fingerprint_hash(build_fingerprint(1))
    # threads are part of every organism's key
    assert OrganismConfig(num_threads=2).folder_name() != OrganismConfig().folder_name()
    assert IntrospectionOrganismConfig(num_threads=2).folder_name() != IntrospectionOrganismConfig().folder_name()
    assert OrganismConfig().kernel_path() == build_fingerprint(1)


@pytest.mark.slow
def test_another_cpu_capability_is_another_cache_folder():
    """The same process environment names the same folders in every process; another capability (AVX2 on an
    AVX-512 machine, else the unvectorised default) names other folders for all three organisms."""
    here = _here()
    assert _names() == here
    other = "avx2" if here["capability"] == "AVX512" else "default"
    if here["capability"] == "DEFAULT":
        other = None  # nothing lower to force: MKL's instruction set below still changes the key
    if other is not None:
        there = _names(ATEN_CPU_CAPABILITY=other)
        assert there["capability"] == other.upper() and there["fingerprint"]["cpu_capability"] == other.upper()
        for name in ("organism", "huginn", "introspection"):
            assert there[name] != here[name], name
            assert there[name].split("-v")[0] == here[name].split("-v")[0]  # same family, same recipe, other hash
    mkl = _names(MKL_ENABLE_INSTRUCTIONS="SSE4_2" if here["fingerprint"]["mkl_instructions"] != "SSE4_2" else "AVX2")
    assert mkl["capability"] == here["capability"]
    assert all(mkl[name] != here[name] for name in ("organism", "huginn", "introspection"))
