"""Loss curves through accelerate's trackers: ``cvit-bench run ... --log-with tensorboard``.

The tracker is built as ``Accelerator.init_trackers`` builds one (any name accelerate knows: its
built-in trackers when their package is installed, and classes registered with
``accelerate.tracking.register_tracker_class``), without an ``Accelerator``: the harness runs its
own loop. Only the main process logs. Per stage K, every optimizer step logs ``stage<K>/loss`` (the
global batch's) and ``stage<K>/lr`` (the first parameter group's learning rate; a projector group
as ``stage<K>/lr_projector``) at step 1, 2, ... of the stage. Logs of a tracker that needs a
directory (TensorBoard) go to ``RUN_DIR/tracking/``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from cvit_bench.registry import ConfigError

NO_TRACKER = "none"
TRACKING_DIR = "tracking"


def tracker_class(name: str) -> type | None:
    """The accelerate tracker class ``--log-with name`` asks for (None for ``none``); refused before any work when
    unknown or when its package is not installed."""
    if name == NO_TRACKER:
        return None
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    if name not in LOGGER_TYPE_TO_CLASS:
        raise ConfigError(f"--log-with {name!r}: expected {NO_TRACKER} or one of accelerate's trackers "
                          f"({', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
    built_in = name in {kind.value for kind in LoggerType}
    if built_in and name not in {str(kind) for kind in get_available_trackers()}:
        raise ConfigError(f"--log-with {name}: the {name} package is not installed (pip install {name}), "
                          f"or run with --log-with {NO_TRACKER}")
    return LOGGER_TYPE_TO_CLASS[name]


@contextlib.contextmanager
def tracking(name: str, run_dir: Path, run_name: str, config: dict[str, Any]) -> Iterator[Any]:
    """The started tracker for ``--log-with name`` (None for ``none``), its run configuration stored (anything but a scalar as
    text: trackers take scalars); finished on the way out, also after an error, so what was logged is flushed."""
    cls = tracker_class(name)
    if cls is None:
        yield None
        return
    tracker = cls(run_name, str(run_dir / TRACKING_DIR)) if cls.requires_logging_directory else cls(run_name)
    tracker.start()
    tracker.store_init_configuration({key: value if isinstance(value, (bool, int, float, str)) else str(value)
                                      for key, value in config.items()})
    try:
        yield tracker
    finally:
        tracker.finish()


def step_logger(tracker: Any, stage: int) -> Callable[[int, float, list[float]], None]:
    """The training loop's per-step callback for ``stage``: every process calls it (the loss it passes is summed over
    processes); only the main process holds a tracker."""

    def log(step: int, loss: float, learning_rates: list[float]) -> None:
        if tracker is not None:
            tracker.log(step_values(stage, loss, learning_rates), step=step)

    return log


def step_values(stage: int, loss: float, learning_rates: list[float]) -> dict[str, float]:
    """What one optimizer step logs: the loss and the learning rate of each parameter group (the first is the method's;
    a second is the projector's, see ``Method.parameter_groups``)."""
    names = ["lr", "lr_projector", *(f"lr_group{k}" for k in range(2, len(learning_rates)))]
    return {f"stage{stage}/loss": loss, **{f"stage{stage}/{n}": lr for n, lr in zip(names, learning_rates)}}
