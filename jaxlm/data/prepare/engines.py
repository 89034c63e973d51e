"""Where `jaxlm data prepare`'s tasks run: processes on this machine, or a Ray cluster.

An engine runs module-level functions over lists of items and gives their results back in item order, so
the stages never depend on which worker finished first. Two shapes cover every stage:

    map(fn, items, *shared)                  -> [fn(item, *shared) for item in items]
    shuffle(map_fn, items, reduce_fn, parts) -> [reduce_fn(j, [map_fn(item, parts, *map_args)[j] for item
                                                 in items], *reduce_args) for j in range(parts)]

A shuffle whose reducers return (state, summary) pairs can leave the states where they are (`keep=True`:
in Ray's object store, as the items of the next shuffle) and bring back only the summaries.

`shared` values (the dropped-id sets, the eval n-grams) go to every task: Ray puts each in its object store
once. Ray tasks that die with their worker are retried (`max_retries`), and every stage's result is a pure
function of its inputs, so a retry reproduces it exactly. Ray core tasks are used rather than Ray Data:
each shuffle here is one explicit hash partitioning whose partitions are reduced by pure functions, which
gives byte-identical output at any worker count and keeps the partitions' sizes visible for the scaling
notes; Ray Data's groupby would add its own block layout and executor start-up for no gain.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import tempfile
from typing import Callable, Sequence

from tqdm import tqdm

from jaxlm.core.config import ConfigError

RETRIES = 3


class Local:
    """Processes of one machine ("spawn": the parent may hold JAX or grain threads that fork would copy).
    With one worker everything runs in this process."""

    name = "local"

    def __init__(self, workers: int, progress: bool):
        self.workers, self.progress = workers, progress
        self._pool = None

    def __enter__(self):
        if self.workers > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()
        return False

    def map(self, fn: Callable, items: Sequence, *shared, desc: str = "") -> list:
        with tempfile.TemporaryDirectory(prefix="jaxlm-shared-") as tmp:
            if self._pool is None:
                calls = [(fn, item, shared) for item in items]
                it = map(_call, calls)
            else:
                # The shared values (dropped ids, eval n-grams: possibly large) go to each worker once, through a
                # file it reads on its first task of this map, not pickled into every task.
                path = os.path.join(tmp, "shared.pickle")
                with open(path, "wb") as f:
                    pickle.dump(shared, f, protocol=pickle.HIGHEST_PROTOCOL)
                it = self._pool.imap(_call_with_file, [(fn, item, path) for item in items])
            return list(tqdm(it, total=len(items), desc=desc, unit="task", disable=not self.progress or not desc,
                             mininterval=1.0))

    def shuffle(self, map_fn: Callable, items: Sequence, reduce_fn: Callable, parts: int, map_args=(),
                reduce_args=(), desc: str = "", keep: bool = False):
        pieces = self.map(map_fn, items, parts, *map_args, desc=desc and f"{desc} (map)")
        columns = [(j, [p[j] for p in pieces]) for j in range(parts)]
        out = self.map(_reduce_column, columns, reduce_fn, *reduce_args, desc=desc and f"{desc} (reduce)")
        return ([o[0] for o in out], [o[1] for o in out]) if keep else out


def _call(call):
    fn, item, shared = call
    return fn(item, *shared)


_SHARED: dict[str, tuple] = {}  # per worker process: the shared values of the map being run, by file


def _call_with_file(call):
    fn, item, path = call
    if path not in _SHARED:
        _SHARED.clear()  # an earlier map's values are not needed again
        with open(path, "rb") as f:  # written by this run's own driver, never by anyone else
            _SHARED[path] = pickle.load(f)
    return fn(item, *_SHARED[path])


def _reduce_column(column, reduce_fn, *shared):
    return reduce_fn(*column, *shared)


class Ray:
    """Tasks on a Ray cluster: the one at `address` ("auto" finds a running one), or a local one started with
    `workers` CPUs. At most `workers` tasks are in flight, so the worker count means the same on a shared
    cluster. The output folder must be on a filesystem every node sees."""

    name = "ray"

    def __init__(self, workers: int, progress: bool, address: str = ""):
        try:
            import ray
        except ImportError:
            raise ConfigError("--engine ray needs Ray: pip install 'jaxlm[ray]'") from None
        self.ray, self.address, self.progress = ray, address, progress
        self.workers = workers
        self._started = False

    def __enter__(self):
        ray = self.ray
        if self.address:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"cannot connect to the Ray cluster at {self.address}: {_first_line(e)}; "
                                  "start one with `ray start --head`, or leave out --ray-address") from None
            self.workers = self.workers or int(ray.cluster_resources().get("CPU", 1))
        else:
            self.workers = self.workers or os.cpu_count() or 1
            ray.init(num_cpus=self.workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        self._started = True
        self._call = ray.remote(max_retries=RETRIES)(_call_args)
        return self

    def __exit__(self, *exc):
        if self._started:
            self.ray.shutdown()
        return False

    def _run(self, submit: Callable[[int], object], count: int, desc: str) -> list:
        """Submits task i with `submit(i)`, keeping at most `workers` in flight; returns the ObjectRefs in order."""
        ray, refs, pending = self.ray, [None] * count, {}
        bar = tqdm(total=count, desc=desc, unit="task", disable=not self.progress or not desc, mininterval=1.0)
        nxt = 0
        while nxt < count or pending:
            while nxt < count and len(pending) < self.workers:
                refs[nxt] = submit(nxt)
                first = refs[nxt][0] if isinstance(refs[nxt], list) else refs[nxt]
                pending[first] = nxt
                nxt += 1
            # Not fetched here: a map's pieces go straight to their reducers; a task that failed for good
            # raises where its result is used.
            done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
            for ref in done:
                pending.pop(ref)
                bar.update(1)
        bar.close()
        return refs

    def _shared(self, shared: tuple) -> tuple:
        return tuple(self.ray.put(s) for s in shared)

    def map(self, fn: Callable, items: Sequence, *shared, desc: str = "") -> list:
        shared = self._shared(shared)
        task = self._call.options(name=fn.__name__)  # the worker's process title: ray::<stage function>
        refs = self._run(lambda i: task.remote(fn, items[i], *shared), len(items), desc)
        return self.ray.get(refs)

    def shuffle(self, map_fn: Callable, items: Sequence, reduce_fn: Callable, parts: int, map_args=(),
                reduce_args=(), desc: str = "", keep: bool = False):
        map_args, shared = self._shared(map_args), self._shared(reduce_args)
        mapper = self._call.options(num_returns=parts, name=map_fn.__name__)
        pieces = self._run(lambda i: mapper.remote(_Split(map_fn), items[i], parts, *map_args), len(items),
                           desc and f"{desc} (map)")
        pieces = [p if isinstance(p, list) else [p] for p in pieces]
        # The pieces are passed as top-level arguments, so Ray hands the reducer their values, fetched to
        # its node: partition j of every map task, and nothing else.
        reducer = self._call.options(num_returns=2 if keep else 1, name=reduce_fn.__name__)
        refs = self._run(lambda j: reducer.remote(_Gather(reduce_fn), j, len(shared), *shared,
                                                  *[p[j] for p in pieces]), parts, desc and f"{desc} (reduce)")
        if keep:
            return [r[0] for r in refs], self.ray.get([r[1] for r in refs])
        return self.ray.get(refs)


def _call_args(fn, item, *args):
    return fn(item, *args)


class _Split:
    """A map function whose list of `parts` results Ray returns as separate objects."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item, parts, *shared):
        out = self.fn(item, parts, *shared)
        return out if parts > 1 else out[0]


class _Gather:
    """A reduce function called with the shared values followed by its column of map pieces."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, part, n_shared, *args):
        return self.fn(part, list(args[n_shared:]), *args[:n_shared])


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_reachable(address: str) -> None:
    """A HOST:PORT that refuses or drops a TCP connection is named at once, instead of after Ray's own
    minute of retries."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT, 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}; start one with "
                          "`ray start --head`, or leave out --ray-address") from None


def make(engine: str, workers: int, progress: bool, address: str = ""):
    if engine == "local":
        if address:
            raise ConfigError("--ray-address needs --engine ray")
        return Local(workers or os.cpu_count() or 1, progress)
    if engine == "ray":
        return Ray(workers, progress, address)
    raise ConfigError(f"unknown engine {engine!r}; use local or ray")

