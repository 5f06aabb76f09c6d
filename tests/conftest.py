"""One torch thread per pytest-xdist worker (`make test` runs `pytest -n auto`).

xdist starts one worker process per core, and each worker's torch would open a thread pool as
wide as the machine: on CI's 2 cores, 2 workers x 2 threads. The threads oversubscribe the cores,
preempt each other mid-kernel and wait at each kernel's end for a thread that was descheduled, so
the suite runs slower than with one thread a worker, which keeps every core busy without
contention. OMP_NUM_THREADS covers the processes the tests start themselves (the command line in
a subprocess, torchrun, the tensor-parallel ranks), which read it when their torch starts. A
serial `pytest` (no PYTEST_XDIST_WORKER) is left as it is.

A test that loads a user's policy file in this process (`--policy-module`, `import_file`) adds
its policies to msrnn's registry; the fixture below puts the registry back after every test, so
which tests share a worker never changes what another one sees."""

import os

import pytest
import torch

from msrnn.policies import REGISTRY

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def registry_as_found():
    """REGISTRY after the test is REGISTRY before it (mutated in place: NAMES is a live view)."""
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)
