"""A sweep's work items on Ray (`--ray ADDRESS`): actors that each load the model once and run
one item at a time, their rows streamed back to the driver as they finish.

    reach(address)       before any work: Ray is installed, and a cluster answers at the
                         address (a short TCP probe, not Ray's own minute-long retries) and
                         lets this process join
    run(items, ...)      the items on `jobs` workers; yields (cell, config, row, line) as each
                         item finishes; raises Lost, after the others finished, naming the items
                         of workers that died for good

The driver (the `msrnn` process) keeps the results file; what crosses the network is each
worker's `load` and `work` once (the options, the tokenized texts or haystacks, the tokenizer),
then an item's configurations out and its rows back. Each worker reads the model from its own
host's disk, at the path the driver names (docs/scale.md, "A sweep across machines").

Ray is an optional extra (`pip install 'msrnn[ray]'`): it is imported only here, and only when
--ray is given.
"""

import socket
import sys
from collections import deque

RESTARTS = 2          # a worker that dies is started again this often, its item retried
PROBE_SECONDS = 5.0   # how long `reach` waits for a cluster to answer


class Lost(RuntimeError):
    """Workers died for good: the message names the items they held (and any never run)."""


def need():
    """The `ray` module, or the one line that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray, an optional extra: pip install 'msrnn[ray]'") from None
    return ray


def reach(address: str):
    """Check, before any work, that --ray ADDRESS can be used: Ray imports, and for an address
    other than `local` a cluster answers there within PROBE_SECONDS and lets this process join
    (`connect`). `auto` is the cluster `ray start` made on this host (or $RAY_ADDRESS). ray.init
    itself would retry an address that does not answer for over a minute. A local instance
    starts only when there is work (`run`)."""
    need()
    if address == "local":
        return
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise ValueError("--ray auto: no Ray cluster was started on this host and "
                             "RAY_ADDRESS is not set; start one with `ray start --head`, give "
                             "its HOST:PORT, or use --ray local") from None
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address}: not an address; use local, auto or HOST:PORT "
                         f"(the head's `ray start --head` prints it, e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), PROBE_SECONDS).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise ValueError(f"--ray {address}: no Ray cluster answers at {host}:{port} ({why}); "
                         f"start one with `ray start --head` there, or use --ray local") from None
    connect(address)


def connect(address: str):
    """ray.init for the address, once a process (a test or a notebook may have connected
    already); the `ray` module."""
    import logging

    ray = need()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)       # "local": a new instance, always
        except ConnectionError as e:
            raise ValueError(f"--ray {address}: {e}; a cluster with token authentication (Ray "
                             f"2.60's `ray start` turns it on) admits a host with "
                             f"RAY_AUTH_MODE=token and the head's ~/.ray/auth_token "
                             f"(docs/scale.md)") from None
    errors_to_stderr()
    return ray


def errors_to_stderr():
    """Ray's driver prints what the cluster reports (`(raylet) A worker died or was killed
    ...`) on stdout, at any time, where `--json` writes its one document: send it to stderr.
    Ray has no setting for this; its printer is swapped for one that marks every message an
    error (a Ray without that printer prints as it does)."""
    from ray._private import worker

    real = getattr(worker, "print_to_stdstream", None)
    if real is None or getattr(real, "to_stderr", False):
        return

    def to_stderr(data, ignore_prefix):
        real({**data, "is_err": True}, ignore_prefix)
    to_stderr.to_stderr = True
    worker.print_to_stdstream = to_stderr


class Worker:
    """A Ray actor: `load()` makes its model, once (again after a restart), and `work(model,
    cell, configs)` computes one item. The model is loaded by the first call, not in the
    constructor, so that a load that fails is that call's error (a clear ValueError comes back
    as it is) rather than an actor that never started."""

    def __init__(self, load, work, threads: int):
        import torch
        torch.set_num_threads(threads)
        self.load, self.work, self.model = load, work, None

    def ready(self) -> str:
        """Load the model; this worker's host."""
        if self.model is None:
            self.model = self.load()
        return socket.gethostname()

    def run(self, cell, configs) -> list:
        self.ready()
        return list(self.work(self.model, cell, configs))


def sizes(ray, jobs: int | None, items: int, gpu: bool) -> tuple[int, dict, int]:
    """(workers, each one's Ray resources, each one's torch threads). By default one worker per
    CPU of the cluster (per GPU with `gpu`), one thread each: a decode step reads every weight,
    and several one-thread processes get through more steps than one process with as many
    threads (docs/results.md); never more workers than items. `jobs` workers share the CPUs
    (GPUs) evenly: a fraction of one each if there are more workers than CPUs. The cluster's
    total, not what is free now: Ray places a worker when its resources free up (those of the
    workers of a run just ended, or another user's), and `run` gives items only to workers
    that started."""
    have = capacity(ray, gpu)
    n = max(1, min(items, jobs or have))
    share = have // n if n <= have else have / n
    if gpu:
        return n, {"num_gpus": min(share, 1), "num_cpus": 0}, 1
    return n, {"num_cpus": share}, max(1, int(share))


def capacity(ray, gpu: bool) -> int:
    """The cluster's CPUs (GPUs with `gpu`): how many workers it runs by default."""
    kind = "GPU" if gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if have == 0:
        raise ValueError(f"--ray: the cluster has no {kind}"
                         + ("; use --device cpu, or add hosts with GPUs" if gpu else ""))
    return have


def run(items: list, load, work, address: str, jobs: int | None = None, gpu: bool = False,
        say=None, split=None):
    """Each item (cell, configurations) on one of the workers (`split(items, workers)`, if
    given, first: sweep.spread, so that every worker can have one), a new item to a worker as soon
    as it returns one, each yielded as (cell, config, row, line) as it comes. A worker that dies
    is started again and its item retried (RESTARTS times); one that dies for good costs only
    its item: the others go on, and Lost names what was not computed at the end. A worker
    whose model loads later than the others simply joins later; one that the cluster cannot
    place (too few resources left) never takes an item."""
    say = say or (lambda line: print(f"[msrnn] {line}", file=sys.stderr))
    ray = connect(address)
    if split is not None:
        items = split(items, jobs or capacity(ray, gpu))
    n, resources, threads = sizes(ray, jobs, len(items), gpu)
    actor = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)(Worker)
    workers = [actor.options(scheduling_strategy="SPREAD", **resources).remote(load, work,
                                                                               threads)
               for _ in range(n)]
    total, hosts = ray.cluster_resources(), sum(node["Alive"] for node in ray.nodes())
    say(f"Ray: {n} worker(s) of {resources['num_gpus' if gpu else 'num_cpus']:g} "
        f"{'GPU' if gpu else 'CPU'} and {threads} thread(s) each, on {hosts} host(s) with "
        f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")
    todo, lost = deque(items), []
    waiting = {w.ready.remote(): (w, None) for w in workers}     # ref -> (worker, its item)
    try:
        while waiting and (todo or any(item for _, item in waiting.values())):
            [ref], _ = ray.wait(list(waiting), num_returns=1)
            worker, item = waiting.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if e.actor_init_failed:                         # it never started
                    cause = [line for line in str(e).splitlines() if line.strip()][-1]
                    raise ValueError(f"--ray {address}: a worker could not start on its host "
                                     f"({cause}); install msrnn, the same version, on every "
                                     f"host of the cluster") from None
                if item is not None:                            # died for good
                    lost.append(item)
                continue
            except ray.exceptions.RayTaskError as e:            # a clear error comes back as is
                raise e.cause if isinstance(e.cause, ValueError) else e from None
            if item is not None:
                cell = item[0]
                for config, row, line in out:
                    yield cell, config, row, line
            if todo:
                item = todo.popleft()
                waiting[worker.run.remote(*item)] = (worker, item)
    except BaseException:                  # an error, Ctrl-C, or the caller stopped early
        for w in workers:
            ray.kill(w)
        raise
    # Done: the workers are left to Ray, which ends each once it drops the last handle (here)
    # and the task it runs ends: a worker still loading its model when the last item came back
    # finishes quietly, where ray.kill would print its task's failure on stdout.
    if lost or todo:
        raise Lost(f"Ray workers died for good (each after {RESTARTS} restarts)"
                   + (", holding " + "; ".join(describe(i) for i in lost) if lost else "")
                   + (f"; {len(todo)} item(s) never ran, no worker being left" if todo else "")
                   + ": what finished is saved; run the same command again for the rest")


def describe(item) -> str:
    """An item in a message: its cell's fields and its configurations."""
    cell, configs = item
    where = " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in (cell or {}).items() if v is not None)
    names = ", ".join(f"{c.name} {c.size}".replace(" None", "") + (
        "" if c.positions == "original" else f" ({c.positions})") for c in configs
        if c is not None) or "the computation"
    return f"{names}{' at ' + where if where else ''}"


def call(load, fn, address: str, gpu: bool = False, say=None):
    """fn(model) on one Ray worker (`msrnn retention`, one computation): its result."""
    import functools

    [(_, _, result, _)] = run([({}, [None])], load, functools.partial(_call, fn), address, 1,
                              gpu, say)
    return result


def _call(fn, model, cell, configs):
    yield None, fn(model), ""
