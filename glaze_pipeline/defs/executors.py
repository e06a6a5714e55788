"""Where a run's steps execute, chosen per run by its config (`execution: config: ...`).

`glaze_executor` is Dagster's `multi_or_in_process_executor` pattern with a third choice:

* `in_process` (the default: nothing set) — every step in the run's own process, as before.
* `multiprocess` — each step in its own process on this machine, at most `max_concurrent` at
  once; forkserver, with `glaze_pipeline.defs.warm` preloaded once in the fork server, unless
  `start_method` says otherwise.
* `celery` — each step is a Celery task run by a worker (`glaze worker`, docs/scaling.md), on
  this machine or another: dagster-celery's executor and its config (broker, backend,
  include, config_source; `config_source: {task_default_queue: ...}` names the queue).

The multiprocess and Celery choices need a reconstructable job, a persistent instance (Postgres
storage, for workers on other machines) and outputs in shared storage (defs/io_manager.py).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

from dagster import (
    Executor,
    ExecutorRequirement,
    Field,
    InitExecutorContext,
    Selector,
    executor,
    multiple_process_executor_requirements,
)
from dagster import _check as check
from dagster._core.definitions.executor_definition import (
    IN_PROC_CONFIG,
    MULTI_PROC_CONFIG,
    _core_in_process_executor_creation,
    _core_multiprocess_executor_creation,
)
from dagster._core.execution.retries import RetryMode
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor

from glaze_pipeline.core.settings import CELERY_BROKER_ENV, DEFAULT_CELERY_BROKER

PRELOAD = "glaze_pipeline.defs.warm"
"""What the multiprocess executor's fork server imports once: every step process forks from it
warm (the definitions, the instance's storage, the drivers), instead of importing Dagster and
the engine again (spawn)."""

IN_ANOTHER_PROCESS = ("multiprocess", "celery")


def with_forkserver_default(config: Mapping[str, object]) -> dict[str, object]:
    """The multiprocess config, with forkserver + preload when no start method is chosen."""
    chosen = dict(config)
    if not chosen.get("start_method"):
        chosen["start_method"] = {"forkserver": {"preload_modules": [PRELOAD]}}
    return chosen


def _requirements(config: Mapping[str, object]) -> Sequence[ExecutorRequirement]:
    if any(choice in config for choice in IN_ANOTHER_PROCESS):
        return multiple_process_executor_requirements()
    return []


def _celery_executor(config: Mapping[str, object]) -> CeleryExecutor:
    # What dagster_celery's own `celery_executor` does with the same config.
    return CeleryExecutor(
        broker=config.get("broker"),
        backend=config.get("backend"),
        config_source=config.get("config_source"),
        include=config.get("include"),
        retries=RetryMode.from_config(check.dict_elem(config, "retries")),
    )


@executor(
    name="glaze_executor",
    config_schema=Field(
        Selector(
            {
                "in_process": IN_PROC_CONFIG,
                "multiprocess": MULTI_PROC_CONFIG,
                "celery": Field(CELERY_CONFIG, description="Each step as a Celery task."),
            }
        ),
        default_value={"in_process": {}},
    ),
    requirements=_requirements,
)
def glaze_executor(init_context: InitExecutorContext) -> Executor:
    """In process (default), one process per step on this machine, or one Celery task per step
    on a pool of workers: chosen by the run's `execution: config:` (see the module docstring)."""
    config = init_context.executor_config
    if "multiprocess" in config:
        return _core_multiprocess_executor_creation(
            with_forkserver_default(check.dict_elem(config, "multiprocess"))
        )
    if "celery" in config:
        return _celery_executor(check.dict_elem(config, "celery"))
    return _core_in_process_executor_creation(check.dict_elem(config, "in_process"))


def selected_executor(run_config: Mapping[str, object]) -> str:
    """The executor a run config selects: "in_process", "multiprocess" or "celery"."""
    execution = run_config.get("execution")
    chosen = execution.get("config") if isinstance(execution, Mapping) else None
    if isinstance(chosen, Mapping):
        for name in IN_ANOTHER_PROCESS:
            if name in chosen:
                return name
    return "in_process"


def side_by_side(run_config: Mapping[str, Any]) -> bool:
    """Whether the run's steps execute in processes of their own (multiprocess, Celery), so
    enrich steps may run at the same time: spans cut to equal work, a shared single-flight."""
    return selected_executor(run_config) != "in_process"


def steps_at_once(run_config: Mapping[str, Any]) -> int:
    """How many steps the run config's executor runs at once, as far as the config says: the
    multiprocess executor's `max_concurrent` (unset or 0: the environment's
    DAGSTER_MULTIPROCESS_EXECUTOR_MAX_CONCURRENT, else one per core, as Dagster reads it);
    1 in process and on Celery (no run config knows its workers: `concurrent_steps` on the
    providers resource says how many)."""
    if selected_executor(run_config) != "multiprocess":
        return 1
    chosen = run_config["execution"]["config"]["multiprocess"] or {}
    configured = chosen.get("max_concurrent") or os.getenv(
        "DAGSTER_MULTIPROCESS_EXECUTOR_MAX_CONCURRENT"
    )
    return max(1, int(configured) if configured else os.cpu_count() or 1)


def run_config_on(run_config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`run_config` with the `execution` section that picks executor `name` (in process, the
    default, leaves it as it is): how a launch path runs a large request on every core
    (`queue.Launchable.executor`)."""
    if name == "in_process":
        return dict(run_config)
    return {**run_config, "execution": execution_config(name)}


def execution_config(
    name: str, *, processes: int | None = None, queue: str = "dagster"
) -> dict[str, Any]:
    """The run config's `execution` section that picks executor `name`: `in_process`,
    `multiprocess` (`processes` steps at once, default one per core) or `celery` (the broker
    from GLAZE_CELERY_BROKER, else RabbitMQ on this machine; tasks on `queue`)."""
    if name == "in_process":
        return {"config": {"in_process": {}}}
    if name == "multiprocess":
        return {"config": {"multiprocess": {"max_concurrent": processes or os.cpu_count() or 1}}}
    if name == "celery":
        broker = os.environ.get(CELERY_BROKER_ENV) or DEFAULT_CELERY_BROKER
        return {
            "config": {
                "celery": {
                    "broker": broker,
                    "backend": "rpc://",
                    "config_source": {"task_default_queue": queue},
                }
            }
        }
    raise ValueError(f"unknown executor {name!r}: in_process, multiprocess or celery")
