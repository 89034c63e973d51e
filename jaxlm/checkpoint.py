"""Orbax checkpoints holding the train state, the data-iterator position and the resolved config together.

Each step is one directory with three items: `state` (params, optimizer state, step, RNG), `data` (grain
iterator state, one JSON file per process) and `config` (the resolved config). Orbax writes into a
temporary directory and renames it only when every item is complete, so a process killed mid-save
leaves nothing that `latest_step` will pick up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)


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


def has_checkpoint(directory: str) -> bool:
    return latest_step(directory) is not None


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
        number of processes, in which case the caller derives the position from the step.
        """
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"checkpoint {self.directory}/{step} does not match this model or optimizer ({e}); "
                f"use a new checkpoint.dir or the config it was saved with"
            ) from None
        snapshot = IteratorSnapshot()
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(snapshot)))
        except ValueError:
            log.warning("checkpoint %d was saved by a different process count; data position comes from the step", step)
        return restored["state"], snapshot.state

    def restore_params(self, step: int, abstract_params):
        """Restores only the params of the train state (for inference: no optimizer state is read)."""
        path = os.path.join(self.directory, str(step), "state")
        item = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise ConfigError(f"checkpoint {path} does not hold params for this model ({e})") from None
        return restored["params"]

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self._drop_superseded_temporaries()
        self.manager.wait_until_finished()
        self.manager.close()

