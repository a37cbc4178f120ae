"""A training process keeps its freed heap: a step's large temporaries are not handed back to the OS and
page-faulted in again on the next step (glibc's default thresholds do that), unless the user tuned malloc."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from igpt.pretrain.host_memory import keep_freed_heap

# Minor page faults per "step" that writes four 8 MiB temporaries and frees them, as a CPU step does its logits.
FAULTS_PER_STEP = r"""
import resource, sys
import numpy as np
from igpt.pretrain.host_memory import keep_freed_heap

if sys.argv[1] == "keep":
    assert keep_freed_heap()


def step():
    temporaries = [np.full(1 << 20, 1.0) for _ in range(4)]
    return sum(float(t[-1]) for t in temporaries)


step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"})
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
def test_a_kept_heap_stops_the_page_faults_of_every_step():
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    assert default > 1000  # glibc's default returns the freed temporaries and faults them in again
    assert kept < 100, (default, kept)


@pytest.mark.parametrize("env", [{"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {"MALLOC_TRIM_THRESHOLD_": "0"}])
def test_a_users_own_allocator_settings_are_left_alone(env):
    assert keep_freed_heap(env) is False
