"""Orbax checkpoints holding the train state, the data-iterator position and the resolved config together.

Each step is one directory with three items: `state` (params, optimizer state, step, RNG), `data` (grain
iterator state, one JSON file per process) and `config` (the resolved config). Orbax writes into a
temporary directory and renames it only when every item is complete, so a process killed mid-save
leaves nothing that `latest_step` will pick up. A step can still be damaged afterwards (an interrupted
copy from a bucket leaves files cut short): `restore_latest` then falls back to the newest intact step,
and `restore_params` names the damaged step and the intact ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm.core.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)

# TensorStore status codes (the prefix of its ValueError messages) for files cut short, missing or corrupt.
# Others, such as UNAVAILABLE or PERMISSION_DENIED, say nothing about the checkpoint and are raised as they are.
DAMAGE_CODES = ("OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION", "NOT_FOUND")


class DamagedCheckpoint(ConfigError):
    """A checkpoint step whose files do not read back. `intact` lists the other steps that do, when known."""

    def __init__(self, path: str, step: int, reason: str, intact: list[int] | None = None):
        self.path, self.step, self.reason, self.intact = path, step, reason, intact
        message = f"checkpoint {path} is damaged ({reason})"
        if intact is not None:
            message += f"; intact steps: {', '.join(map(str, intact))}" if intact else "; no other step is intact"
        super().__init__(message)


def damage_reason(error: BaseException) -> str | None:
    """Why `error` (raised reading a checkpoint) means damaged files, or None if it does not."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        code = text.split(":", 1)[0]
        if isinstance(error, ValueError) and code in DAMAGE_CODES:
            # "CODE: Error opening ...: Error reading ... of local file "F": what is wrong [tensorstore_spec=...]":
            # keep the code and the clauses from the one naming the file on.
            clauses = text.split(" [tensorstore_spec=")[0].split(": ")[1:]
            named = [i for i, c in enumerate(clauses) if ' file "' in c]
            return f"{code}: " + ": ".join(clauses[named[-1] if named else -1:])
        if isinstance(error, json.JSONDecodeError):
            return f"unreadable metadata: {error}"
        if isinstance(error, FileNotFoundError):
            return text
        error = error.__cause__ or error.__context__
    return None


def _is_abandoned_read(unraisable) -> bool:
    """After one read of a restore fails, Orbax closes its event loop with the other reads still pending; as
    they finish or are collected, Python reports each (as "Event loop is closed", or the coroutine's own
    error) through sys.unraisablehook, long after the real error was handled."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _AbandonedTaskFilter(logging.Filter):
    """The same abandoned reads, as asyncio logs them when their tasks are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not ("exception was never retrieved" in message or "Task was destroyed but it is pending" in message)


def quiet_abandoned_reads() -> None:
    """Drops the reports of abandoned reads (see `_is_abandoned_read`), and only those; idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "jaxlm_quiet", False):
        return

    def hook(unraisable) -> None:
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook.jaxlm_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedTaskFilter())


def check_tree(path: str, abstract, partial: bool = False) -> None:
    """Compares the saved tree at `path` (names and shapes, from its metadata) with `abstract` before any
    array is read. Raises a one-line ValueError naming the first differences, or the error that reading
    the metadata raised. With `partial`, the checkpoint may hold arrays `abstract` lacks.

    Orbax finds a wrong shape only inside its concurrent reads, whose failure leaves the others abandoned
    (see `_is_abandoned_read`); checking first makes a wrong config a clean error.
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = ocp.tree.to_flat_dict(handler.metadata(epath.Path(path)).tree)
    finally:
        handler.close()
    wanted = ocp.tree.to_flat_dict(abstract)
    name = lambda key: ".".join(map(str, key))
    missing = sorted(name(k) for k in wanted.keys() - saved.keys())
    extra = [] if partial else sorted(name(k) for k in saved.keys() - wanted.keys())
    shapes = [f"{name(k)}: saved {_shape(saved[k])}, this model {_shape(v)}" for k, v in wanted.items()
              if k in saved and _shape(saved[k]) != _shape(v)]
    problems = ([f"the checkpoint lacks {len(missing)} arrays, e.g. {missing[0]}"] if missing else []) + (
        [f"this model lacks {len(extra)} saved arrays, e.g. {extra[0]}"] if extra else []) + shapes[:1]
    if problems:
        raise ValueError("; ".join(problems))


def _shape(metadata) -> tuple:
    return tuple(getattr(metadata, "shape", None) or ())


class IteratorSnapshot:
    """The iterator state taken at save time.

    Handing grain's handler this snapshot instead of the live iterator means an async save cannot record
    a position the training loop has already moved past.
    """

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by grain's handler after restoring
        pass


def latest_step(directory: str) -> int | None:
    """The newest finalised checkpoint step in `directory`, or None; looks without creating anything
    (Orbax renames a step's temporary directory to its plain number only when the save is complete)."""
    from etils import epath

    path = epath.Path(directory if "://" in directory else os.path.abspath(os.path.expanduser(directory)))
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit()] if path.is_dir() else []
    return max(steps, default=None)


def save_params(directory: str, params, step: int, config: dict, options: CheckpointConfig, seed: int = 0) -> None:
    """A model-only checkpoint at `step` (no optimizer state), as generate, eval and export read it; kept if
    that step is already there."""
    import jax.numpy as jnp
    import optax

    from jaxlm.core.train_state import TrainState

    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=optax.EmptyState(),
                       rng=jax.random.key_data(jax.random.key(seed)))
    ckpt = Checkpointer(directory, dataclasses.replace(options, async_save=False))
    try:
        if step not in ckpt.manager.all_steps():
            ckpt.save(step, state, None, config, force=True)
    finally:
        ckpt.close()


class Checkpointer:
    def __init__(self, directory: str, config: CheckpointConfig):
        directory = directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last,
            keep_period=config.keep_every or None,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self.directory = directory
        self._temporaries: set[int] | None = None
        self._closed = False
        self.manager = ocp.CheckpointManager(
            directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict, force: bool = False,
             temporary: bool = False) -> bool:
        """Saves `step` (asynchronously if configured). A temporary (time-based) checkpoint is deleted
        once a later checkpoint is complete, so a preemption never leaves the run without one."""
        self._drop_superseded_temporaries()
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(IteratorSnapshot(data_state)),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
            custom_metadata={"temporary": True} if temporary else None,
        )
        if saved and temporary:
            self.temporaries.add(step)
        return saved

    @property
    def temporaries(self) -> set[int]:
        """Steps saved as temporary, including those left by an earlier run in this directory."""
        if self._temporaries is None:
            self._temporaries = set()
            for step in self.manager.all_steps():
                try:
                    meta = self.manager.metadata(step).custom_metadata or {}
                except (FileNotFoundError, ValueError, AttributeError):
                    continue
                if meta.get("temporary"):
                    self._temporaries.add(step)
        return self._temporaries

    def _drop_superseded_temporaries(self) -> None:
        """Deletes every temporary checkpoint older than the latest complete one."""
        if not self.temporaries:
            return
        self.manager.wait_until_finished()  # the latest save is now complete
        latest = self.manager.latest_step()
        for step in sorted(self.temporaries):
            if latest is not None and step < latest:
                if step in self.manager.all_steps():
                    self.manager.delete(step)
                self.temporaries.discard(step)

    def restore(self, step: int, abstract_state) -> tuple[object, dict | None]:
        """Restores into `abstract_state` (ShapeDtypeStructs with the target shardings, any mesh).

        Returns (state, data_state); data_state is None when the checkpoint was written by a different
        number of processes (or its data item is damaged), in which case the caller derives the position
        from the step. Raises ConfigError if the checkpoint holds another model or optimizer, and
        DamagedCheckpoint if its state does not read back.
        """
        path = os.path.join(self.directory, str(step))
        state_path = os.path.join(path, "state")
        mismatch = (f"checkpoint {path} does not match this model or optimizer ({{}}); use a new checkpoint.dir "
                    f"or the config it was saved with")
        self._read(step, lambda: check_tree(state_path, abstract_state), mismatch)
        restored = self._read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))), mismatch)
        snapshot = IteratorSnapshot()
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(snapshot)))
        except (ValueError, KeyError, FileNotFoundError) as e:
            why = damage_reason(e) or "saved by a different process count"
            log.warning("checkpoint %s: the data position is unusable (%s); it comes from the step", path, why)
            snapshot.state = None
        return restored["state"], snapshot.state

    def _read(self, step: int, read, mismatch: str | None = None):
        """Runs `read`; an error that means damaged files becomes DamagedCheckpoint, and with `mismatch` (a
        message with {} for the cause) any other ValueError, KeyError or TypeError becomes a ConfigError."""
        quiet_abandoned_reads()
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - Orbax wraps read errors in plain Exception
            reason = damage_reason(e)
            if reason is not None:
                raise DamagedCheckpoint(os.path.join(self.directory, str(step)), step, reason) from None
            if mismatch is not None and isinstance(e, (ValueError, KeyError, TypeError)):
                raise ConfigError(mismatch.format(str(e).splitlines()[0] if str(e) else repr(e))) from None
            raise

    def restore_latest(self, abstract_state) -> tuple[int, object, dict | None] | None:
        """(step, state, data_state) of the newest step that reads back, or None if there is no step.

        A damaged step is skipped with a warning, and once an older step has been restored it is moved
        aside (to `<step>.damaged`), so that the run saves that step number again. A config mismatch
        raises, as does a directory whose every step is damaged.
        """
        from jaxlm.core.distributed import Agreement  # every host must resume from the same step

        agree = Agreement(timeout_s=3600.0)
        damaged: dict[int, str] = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
                failure = None
            except DamagedCheckpoint as e:
                failure = e.reason
            # A damaged file may hold only some hosts' shards: one damaged host means a damaged step.
            if not agree(f"restore/{step}", int(failure is not None))[0]:
                self._set_aside(sorted(damaged), agree)
                return step, state, data_state
            damaged[step] = failure or "damaged on another host"
            log.warning("checkpoint %s (step %d) is damaged (%s); trying the step before it",
                        os.path.join(self.directory, str(step)), step, damaged[step])
        if damaged:
            raise ConfigError(
                f"every checkpoint in {self.directory} is damaged (steps {', '.join(map(str, sorted(damaged)))}; "
                f"step {max(damaged)}: {damaged[max(damaged)]}); move them away to start afresh, or restore a copy")
        return None

    def _set_aside(self, steps: list[int], agree) -> None:
        """Renames damaged steps to `<step>.damaged` (kept for inspection; Orbax ignores the name)."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                source = epath.Path(self.directory) / str(step)
                target = source.parent / f"{step}.damaged"
                n = 1
                while target.exists():
                    target, n = source.parent / f"{step}.damaged.{n}", n + 1
                source.rename(target)
                log.warning("moved the damaged checkpoint %s to %s", source, target)
        agree("restore/set-aside", 0)  # the renames are done before any host lists the steps again
        self.manager.reload()
        self.temporaries.difference_update(steps)

    def restore_params(self, step: int, abstract_params):
        """Restores only the params of the train state (for inference: no optimizer state is read).

        Raises ConfigError if the checkpoint holds another model, and DamagedCheckpoint, naming the intact
        steps, if its params do not read back."""
        path = os.path.join(self.directory, str(step), "state")
        item = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)

        def read():
            with ocp.PyTreeCheckpointer() as checkpointer:
                return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True))

        mismatch = f"checkpoint {path} does not hold params for this model ({{}})"
        try:
            self._read(step, lambda: check_tree(path, item, partial=True), mismatch)
            return self._read(step, read, mismatch)["params"]
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(e.path, step, e.reason, self.intact_steps(exclude=step)) from None

    def intact_steps(self, exclude: int | None = None) -> list[int]:
        """The steps whose state metadata and array index read back. This reads no array data, so a step
        whose data files alone are cut short still counts; restoring it then reports it as damaged."""
        intact = []
        for step in self.manager.all_steps():
            if step == exclude:
                continue
            try:
                self._read(step, lambda: check_tree(os.path.join(self.directory, str(step), "state"), {}, partial=True))
                intact.append(step)
            except DamagedCheckpoint:
                pass
        return sorted(intact)

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases Orbax's threads; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._drop_superseded_temporaries()
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:  # on the way out of an error: close, without hiding that error behind one from closing
            self.close()
        except Exception as e:  # noqa: BLE001
            log.warning("closing the checkpointer of %s after an error failed too: %s", self.directory, e)

