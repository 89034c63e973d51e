"""Orbax checkpoints holding the train state, the data-iterator position and the resolved config together.

Each step is one directory with three items: `state` (params, optimizer state, step, RNG), `data` (grain
iterator state, one JSON file per process) and `config` (the resolved config). Orbax writes into a
temporary directory and renames it only when every item is complete, so a process killed mid-save
leaves nothing that `latest_step` will pick up.
"""

from __future__ import annotations

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

    def save(self, step: int, state, data_state: dict, config: dict, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(IteratorSnapshot(data_state)),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

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

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

