import os
import platform
import subprocess
import sys

import pytest

from reinseg import allocator

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)

# A repeated "step" that allocates, writes and frees 160 MiB in four tensors (40,960 pages);
# prints the page faults of steps 11-20, when the allocator has reached its steady state.
# One allocation after one free is not the oracle: whether that exact block is reused depends on
# where small allocations landed (posix_memalign asks a little more than the freed block holds).
_PROBE = """
import resource
import torch
from reinseg.allocator import keep_freed_memory
print(keep_freed_memory())
def step():
    x = torch.ones(16 * 2**20)
    y = x * 2
    z = torch.ones(4 * 2**20) + y[: 4 * 2**20]
    del x, y, z
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
_PAGES_TOUCHED = 10 * 40_960


def _probe(setting: str) -> tuple[str, int]:
    env = dict(os.environ, REINSEG_ALLOCATOR=setting)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.slow  # two fresh interpreters
@glibc
def test_freed_memory_is_reused_without_new_page_faults():
    """The oracle is the kernel's page-fault count: with the system allocator the 64 MiB blocks
    come from fresh mmaps each step and fault their pages in anew (seen: 46-100 % of the pages
    touched; the share varies from run to run on this machine's kernel); with the setting,
    steady-state steps reuse the heap (seen: 0-1 %)."""
    applied, kept = _probe("keep")
    assert applied == "True" and kept < _PAGES_TOUCHED // 10
    applied, system = _probe("system")
    assert applied == "False" and system > _PAGES_TOUCHED // 5 and system > 10 * kept


def test_a_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("REINSEG_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="REINSEG_ALLOCATOR must be 'keep' or 'system', got 'jemalloc'"):
        allocator.keep_freed_memory()


def test_the_command_applies_it_and_reports_a_bad_setting(capsys, monkeypatch):
    from reinseg.cli import main

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("REINSEG_ALLOCATOR", "nope")
    assert main(["backbones"]) == 2
    assert "REINSEG_ALLOCATOR" in capsys.readouterr().err


@glibc
def test_before_torch_is_imported_it_asks_for_aligned_huge_pages(monkeypatch):
    """PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: the setting adds it
    only while torch is not imported yet, and never overrides the environment's value."""
    monkeypatch.delenv("REINSEG_ALLOCATOR", raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr(allocator, "_applied", False)
    assert allocator.keep_freed_memory()  # torch is imported here (pytest's conftest)
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.delitem(sys.modules, "torch")
    assert allocator.keep_freed_memory()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert allocator.keep_freed_memory()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
