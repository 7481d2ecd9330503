import os
import platform
import subprocess
import sys

import pytest

from reinseg import allocator

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)

# Allocate, touch and free a 64 MiB block twice; print the page faults of the second time.
_PROBE = """
import os, resource, sys
import torch
from reinseg.allocator import keep_freed_memory
print(keep_freed_memory())
def touch():
    block = torch.ones(16 * 2**20)  # 64 MiB, written
    del block
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(setting: str) -> tuple[str, int]:
    env = dict(os.environ, REINSEG_ALLOCATOR=setting)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@glibc
def test_freed_memory_is_reused_without_new_page_faults():
    """The oracle is the kernel's page-fault count: a 64 MiB block allocated again after being
    freed faults its 16,384 pages in anew with the system allocator, and not with the setting."""
    applied, faults = _probe("keep")
    assert applied == "True" and faults < 1000
    applied, faults = _probe("system")
    assert applied == "False" and faults > 10_000


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
