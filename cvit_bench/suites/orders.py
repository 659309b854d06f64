"""Task orders: a suite's training tasks trained in another sequence.

A method's rank can change with the order its tasks come in, so a suite may name permutations
of its tasks under ``orders:`` and ``--order`` trains any permutation. The listed order is the
default and leaves a run exactly as it was before orders existed (same config, same run
directory); any other order is part of the run's setup (the suite's tasks are recorded in the
order they were trained) and gets its own run directory ``seed<N>-order-<name>``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cvit_bench.paths import config_hash
from cvit_bench.registry import ConfigError, unknown_name_message
from cvit_bench.suites.schema import DEFAULT_ORDER, Suite, permutation_problems


@dataclass(frozen=True)
class TaskOrder:
    """A non-default order: its name (the suite's, or a short hash of an ad-hoc list) and the tasks in training order."""

    name: str
    tasks: tuple[str, ...]
    declared: bool  # named in the suite's ``orders:`` (else given as a comma list)

    @property
    def spec(self) -> str:
        """The ``--order`` value that gives this order again: its name, or the comma list when the suite does not name it."""
        return self.name if self.declared else ",".join(self.tasks)


def resolve_order(suite: Suite, spec: str | None) -> TaskOrder | None:
    """The order ``--order SPEC`` asks for; None for the listed order (also when SPEC names or lists it).

    A comma list that equals a declared order takes that order's name, so one permutation has one
    run directory and one leaderboard whichever way it was asked for.
    """
    if spec is None:
        return None
    if "," in spec:
        tasks = tuple(name.strip() for name in spec.split(","))
        mismatch = permutation_problems(list(tasks), suite.task_names)
        if mismatch:
            raise ConfigError(f"--order {spec!r}: must list each task of {suite.path} exactly once ({mismatch})")
    elif spec in suite.orders:
        tasks = suite.orders[spec]
    elif spec == DEFAULT_ORDER:
        return None
    elif suite.orders:
        raise ConfigError(f"--order {spec!r}: {suite.path}: orders: {unknown_name_message('order', spec, list(suite.orders))}; "
                          f"or give a comma-separated permutation of its tasks ({','.join(suite.task_names)})")
    else:
        raise ConfigError(f"--order {spec!r}: {suite.path} declares no orders; give a comma-separated permutation of its tasks "
                          f"({','.join(suite.task_names)})")
    if list(tasks) == suite.task_names:
        return None
    name = next((name for name, declared in suite.orders.items() if declared == tasks), None)
    return TaskOrder(name or ad_hoc_order_name(tasks), tasks, name is not None)


def ad_hoc_order_name(tasks: tuple[str, ...] | list[str]) -> str:
    """A short stable name for an order the suite does not name."""
    return config_hash(list(tasks), 8)


def order_label(spec: str | None) -> str:
    """The name of the order a run recorded in ``request.order`` (``default`` when it recorded none)."""
    if spec is None:
        return DEFAULT_ORDER
    return ad_hoc_order_name(spec.split(",")) if "," in spec else spec


def in_order(suite: Suite, order: TaskOrder | None) -> Suite:
    """The suite with its training tasks in ``order`` (the same suite for the listed order); applying it twice changes nothing."""
    if order is None:
        return suite
    by_name = {task.name: task for task in suite.tasks}
    return dataclasses.replace(suite, tasks=tuple(by_name[name] for name in order.tasks))


def default_run_id(seed: int, order_name: str | None, only: str | None = None, variant: str | None = None) -> str:
    """``seed<N>``, ``seed<N>-order-<name>`` for a non-default order, ``seed<N>-only-<task>`` for a single-task reference
    run, ``seed<N>-variant-<name>`` (before any order) for a named variant, so runs of different setups never share a directory."""
    if only is not None:
        return f"seed{seed}-only-{only}"
    named = f"seed{seed}" if variant is None else f"seed{seed}-variant-{variant}"
    return named if order_name is None or order_name == DEFAULT_ORDER else f"{named}-order-{order_name}"


def single_task(suite: Suite, task: str) -> Suite:
    """The suite reduced to one training task and no unseen task: DESIGN §4's single-task reference run (the
    plasticity ceiling a continual run is read against). Applying it twice changes nothing."""
    chosen = tuple(t for t in suite.tasks if t.name == task)
    if not chosen:
        raise ConfigError(f"--only {task!r}: {unknown_name_message('training task', task, suite.task_names)}")
    return dataclasses.replace(suite, tasks=chosen, unseen=(), orders={})
