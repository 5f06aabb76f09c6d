"""One sweep harness for every experiment: ppl, retention, needle, tasks and drift.

An experiment is a grid: configurations (a policy at a size, under a position scheme) against
cells (lengths and depths, tasks, prompt kinds, or the whole set of chunks). Around the work of
one cell, every command needs the same things, written here once:

    configurations(...)                the policy grid x the position schemes, each checked
    Sweep(name, out, setup, key, ...)  the results file in `out`, keyed by `setup` (the model,
                                       a digest of the texts, every option that changes a
                                       number): written atomically after each row, resumed by a
                                       later run, refused for another setup
    sweep.pending(cells, configs)      the to-do list: the (cell, configuration) pairs the
                                       results file does not hold yet
    batches(todo, n)                   the work items: each cell's configurations in groups of
                                       up to n that run together as the rows of one batch
                                       (`--batch-configs`; `fit` picks n from a memory budget)
    sweep.run(todo, load, work)        the model loaded once, only if there is work, and
                                       warmed up; the progress bar; a line per row; the items
                                       here, or in `jobs` processes, each with its own model, or,
                                       with `ray`, on the workers of a Ray cluster
                                       (experiments.cluster)
    sweep.rows(cells, configs)         the results in the grid's order, for tables and plots

A command (msrnn/cli) checks its arguments, makes a Sweep, and prints and plots its rows; an
experiment module (evaluate, needle, tasks, drift) computes one cell for a few configurations.
"""

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import policies
from ..policies import Policy
from .output import Results


@dataclass(frozen=True)
class Config:
    """One configuration of a sweep: a policy by its command-line name and size (None: Full),
    and the position scheme its states are numbered by."""

    name: str
    size: int | None
    policy: Policy
    positions: str = "original"

    def fields(self, key) -> dict:
        """What identifies this configuration in a results row (of those in `key`)."""
        mine = {"policy": self.name, "size": self.size, "positions": self.positions}
        return {k: v for k, v in mine.items() if k in key}


def configurations(names, sizes, sinks=None, observe: int = 1, schemes=("original",),
                   limit: int | None = None, what: str = "", bounded_only: bool = False,
                   name: str = "size"):
    """Every policy name at every size (policies.grid), under every position scheme. Full keeps
    every state, which every scheme numbers alike (msrnn.positions), so it runs once, under the
    first. `limit`: each size must be smaller than it (`what` names it in the error, `name` the
    size); bounded_only: leave Full out."""
    out = []
    for label, size, policy in policies.grid(names, sizes, sinks, observe):
        if bounded_only and not policy.bounded:
            continue
        if limit is not None:
            policies.check_fits(policy, limit, what, name=name)
        out += [Config(label, size, policy, s) for s in (schemes if policy.bounded else
                                                        schemes[:1])]
    return out


def backend(directory: str, dtype: torch.dtype = torch.float32, device="cpu",
            kind: str = "msrnn", tp: int = 1, compile: bool | str = False,
            quantize: str | None = None):
    """The backend an experiment runs on: msrnn's decoder (compile: its step compiled, "cpp":
    launched by inductor's C++ wrapper; quantize: its weights int8 or int4), or a transformers
    model (`kind` "transformers", msrnn.hf); with tp > 1, this rank's part of it (on CUDA, the
    GPU cuda:LOCAL_RANK)."""
    if kind == "transformers":
        from .. import hf
        return hf.HFBackend(hf.load(directory, dtype=dtype, device=device, tp=tp))
    from .. import load
    model = load(directory, dtype=dtype, device=device, tp=tp, quantize=quantize)
    if not compile:
        return model
    return model.compile_step(wrapper="cpp" if compile == "cpp" else "python")


def batches(todo: list, n: int, sequential: bool = False) -> list:
    """The work items [(cell, configurations)]: each cell's pending configurations in groups of
    up to n, to run together as the rows of one batch (Backend.init_state with a policy per
    row). Rows of one batch share a multi-state, so a group shares a position scheme; and a
    batch's slots are its largest row's, so Full (which keeps every token) runs apart from
    the bounded configurations, which would pay for its slots. `sequential`: the prompts enter
    step by step (ppl; --prompt-mode sequential), where a positional policy at the original
    positions runs its whole prompt as one masked pass (prompt.parallel_prefix) that a batch
    with other policies would turn into steps: it runs alone (`masked`). Groups keep the
    grid's order."""
    items = []
    for cell, configs in todo:
        groups = {}
        for i, c in enumerate(configs):
            kind = ("alone", i) if sequential and masked(c) else c.policy.bounded
            groups.setdefault((c.positions, kind), []).append(c)
        for group in groups.values():
            items += [(cell, group[i:i + n]) for i in range(0, len(group), n)]
    return items


def spread(items: list, workers: int) -> list:
    """The work items, the largest split in halves until there are at least `workers` of them
    (or each holds one configuration): a cell's configurations fit one batch by memory, and as
    one item they would leave every worker but one idle. Splitting keeps the grid's order."""
    items = list(items)
    while len(items) < workers:
        i = max(range(len(items)), key=lambda j: len(items[j][1]))
        cell, configs = items[i]
        if len(configs) == 1:
            break
        half = (len(configs) + 1) // 2
        items[i:i + 1] = [(cell, configs[:half]), (cell, configs[half:])]
    return items


def masked(config: Config) -> bool:
    """Whether a configuration's sequential prompt is one masked parallel pass: a policy that
    decides by position alone (it reads nothing: Window, Sinks) at the original positions."""
    return config.policy.bounded and not config.policy.reads and config.positions == "original"


def memory() -> int:
    """This machine's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit(cfg, rows: int, slots: int, tokens: int, dtype_bytes: int = 4,
        budget: int | None = None) -> tuple[int, int]:
    """(n, bytes per configuration): how many configurations run together by default. One
    configuration's `rows` rows (its chunks or samples) hold multi-states of `slots` slots and
    the prompt's hidden states and activations, about four [tokens, dim] float32 tensors a row;
    n is as many as `budget` bytes hold (default: a quarter of this machine's memory), at
    least 1."""
    state = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * slots * dtype_bytes
    each = rows * (state + 4 * tokens * cfg.dim * 4)
    budget = memory() // 4 if budget is None else budget
    return max(1, budget // each), each


class Sweep:
    """A sweep's results and its run (see the module's docstring). `key`: the fields of a row
    that identify it (a cell's and a configuration's); `fields`: the columns of results.csv."""

    def __init__(self, name: str, out: str | None, setup: dict, key: tuple, fields: list,
                 log=None):
        self.name, self.key, self.log = name, key, log or sys.stderr
        self.results = Results(out, setup, key, fields)
        self.model = None                     # loaded by the first run that runs here

    def say(self, text: str):
        """A line on the log, under the progress bar if one is running."""
        tqdm.write(f"[msrnn {self.name}] {text}", file=self.log)

    def get(self, cell: dict, config: Config):
        """The saved row of (cell, config), or None."""
        return self.results.get({**cell, **config.fields(self.key)})

    def pending(self, cells: list, configs: list, applies=None) -> list:
        """[(cell, [configurations it still lacks])] for the cells (dicts of their key fields)
        that lack any; `applies(cell, config)`: whether the pair belongs to the grid at all."""
        todo = [(cell, [c for c in configs if (applies is None or applies(cell, c))
                        and self.get(cell, c) is None]) for cell in cells]
        return [(cell, configs) for cell, configs in todo if configs]

    def rows(self, cells: list, configs: list, applies=None) -> list:
        """The saved rows of the grid, cell by cell."""
        return [self.get(cell, c) for cell in cells for c in configs
                if applies is None or applies(cell, c)]

    def run(self, todo: list, load, work, jobs: int | None = None, ray: str | None = None,
            gpu: bool = False, batch: int = 1, sequential: bool = False):
        """Compute every pending pair and save each row as it comes. `load()` makes the model
        (called once, and only if there is work; the Sweep keeps it for a later run); `work(
        model, cell, configs)` runs the configurations together, as the rows of one batch, and
        yields (config, row, line) for each: the row's measured fields and a line for the log.

        The work items are `batches(todo, batch, sequential)`: up to `batch` configurations of
        a cell (of one scheme) at a time, split by `spread` when they are fewer than the
        workers. Where they run: here, one after another (the default); with jobs > 1, each in
        one of `jobs` worker processes, each with its own model (`load` and `work` must
        pickle); with `ray` (an address: local, auto or HOST:PORT), each on a worker of that
        Ray cluster (msrnn.experiments.cluster: `jobs` workers, by default one per CPU of the
        cluster, or per GPU with `gpu`; `load` and `work` go through cloudpickle, so closures
        do too). Rows are saved in the order they
        finish; `rows` puts them in the grid's order. Raises cluster.Lost, after saving every
        row that came back, when Ray workers died for good."""
        if not todo:
            return
        started = time.perf_counter()
        total = sum(len(configs) for _, configs in todo)
        work_items = batches(todo, batch, sequential)
        with tqdm(total=total, desc=self.name, unit="config", file=self.log) as bar:
            if ray is not None:
                from . import cluster
                done = cluster.run(work_items, load, work, ray, jobs, gpu, self.say, spread)
            elif (jobs or 1) > 1:
                done = self._pool(work_items, load, work, jobs)
            else:
                done = self._serial(work_items, load, work, bar)
            for cell, config, row, line in done:
                self.results.add({**cell, **config.fields(self.key), **row})
                self.say(line)
                bar.update(1)
        self.say(f"{time.perf_counter() - started:.0f} s")

    def _serial(self, work_items, load, work, bar):
        if self.model is None:
            self.model = load()
        for cell, configs in work_items:
            bar.set_postfix_str(", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in cell.items() if v is not None))
            for config, row, line in work(self.model, cell, configs):
                yield cell, config, row, line

    @staticmethod
    def _pool(items, load, work, jobs: int):
        """Each work item in one of `jobs` processes, each with its share of the CPU threads. A
        decode step with a few rows is bound by reading the weights, and the library's matrix
        multiply reads them barely faster with two threads than with one: two one-thread
        processes finish about 1.6x as many steps on two cores (docs/results.md)."""
        threads = max(1, torch.get_num_threads() // jobs)
        items = spread(items, jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_start, initargs=(load, threads)) as pool:
            futures = {pool.submit(_worker_run, work, cell, configs): cell
                       for cell, configs in items}
            for future in as_completed(futures):
                for config, row, line in future.result():
                    yield futures[future], config, row, line


_worker_model = None            # a worker process's model (Sweep._pool)


def _worker_start(load, threads: int):
    global _worker_model
    torch.set_num_threads(threads)
    _worker_model = load()


def _worker_run(work, cell, configs):
    return list(work(_worker_model, cell, configs))
