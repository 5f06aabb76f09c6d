"""One torch thread per pytest-xdist worker (`make test` runs `pytest -n auto`).

xdist starts one worker process per core. torch's CPU kernels would each open a thread pool as
wide as the machine, so on CI's 2 cores two workers would run 2 x 2 threads: the threads
oversubscribe the cores, preempt each other mid-kernel and run slower than one worker would.
One thread per worker keeps the cores busy without contention. OMP_NUM_THREADS covers the
processes the tests start themselves (the command line in a subprocess, torchrun, the
tensor-parallel ranks), which read it when their torch starts. A plain serial `pytest` keeps
torch's defaults."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
