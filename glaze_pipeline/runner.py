"""Running one Dagster job in this process: the one way `glaze enrich`, `glaze estimate`,
`glaze ai ...`, the fork launcher's children and the benchmark worker execute a job.

A run started here is a real run of the Dagster instance ($DAGSTER_HOME's, else
.glaze/dagster's): its events, logs and asset materializations are kept like any other. A
failed run does not raise: its `RunOutcome` carries `run_failure(result)`, the one-line error a
person reads, and each caller decides what a failure means to it (the CLI raises it, the
launcher's child exits 1, the benchmark records it, an AI request is closed with it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glaze_pipeline.core import queue
from glaze_pipeline.core.errors import GlazeError, ServiceUnavailableError
from glaze_pipeline.core.settings import glaze_home
from glaze_pipeline.core.store import Store

if TYPE_CHECKING:
    from dagster import DagsterInstance, Definitions, ExecuteInProcessResult, LoggerDefinition

    from glaze_pipeline.core.schema import EnrichmentRequest


@dataclass(frozen=True)
class RunOutcome:
    """How an in-process run ended.

    `request_id` is the request the run served, when known without a query: the one its tags
    name, else the one `enrich_table`'s first op planned for (a run that succeeded).
    `failure` is `run_failure(result)` for a failed run, None otherwise. `result` is Dagster's
    own, for callers that read its events or outputs (the benchmark)."""

    run_id: str
    success: bool
    request_id: str | None
    failure: Exception | None
    result: ExecuteInProcessResult


def run_in_process(
    job_name: str,
    run_config: Mapping[str, Any],
    *,
    database_url: str | None,
    providers_file: str | None = None,
    definitions: Definitions | None = None,
    instance: DagsterInstance | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    log_level: str | None = "INFO",
    one_line_log: bool = True,
) -> RunOutcome:
    """Execute `job_name` with `run_config` (from `queue.job_run`) in this process.

    `definitions` defaults to `build_definitions(database_url, providers_file)` (a warm process
    passes the ones it built once); `instance` to `dagster_instance()`, opened and closed here.
    The console log is one line per event at `log_level` (`one_line_log`, what a person at a
    terminal reads), or Dagster's own, stack traces included; `log_level=None` leaves the
    console logger's level at Dagster's default, as a launched run logs.
    """
    if definitions is None:
        from glaze_pipeline.definitions import build_definitions

        definitions = build_definitions(database_url, providers_file)
    job = definitions.get_job_def(job_name)
    if one_line_log:
        job = job.with_logger_defs({"console": one_line_run_logger()})
    config: dict[str, Any] = dict(run_config)
    if log_level is not None:
        config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    with nullcontext(instance) if instance is not None else dagster_instance() as opened:
        result = job.execute_in_process(
            run_config=config,
            instance=opened,
            tags=dict(tags) if tags is not None else None,
            run_id=run_id,
            raise_on_error=False,
        )
    return RunOutcome(
        run_id=result.run_id,
        success=result.success,
        request_id=_served_request(job_name, tags, result),
        failure=None if result.success else run_failure(result),
        result=result,
    )


def _served_request(
    job_name: str, tags: Mapping[str, str] | None, result: ExecuteInProcessResult
) -> str | None:
    if tags is not None and tags.get(queue.REQUEST_TAG):
        return tags[queue.REQUEST_TAG]
    if job_name == queue.ENRICH_JOB and result.success:
        return str(result.output_for_node(queue.ENRICH_OP, "plan").request_id)
    return None


def run_enrich_job(
    database_url: str | None,
    op_config: Mapping[str, Any],
    *,
    log_level: str = "INFO",
    debug: bool = False,
) -> EnrichmentRequest:
    """Execute enrich_table (an `enrich` or `estimate`) in process; the request as it ended.

    At INFO the job's own progress lines show (entities found, each chunk, rows applied), one
    line each; a failed run raises `run_failure(result)` (one line). With `debug`, Dagster's
    own console log, stack traces included.
    """
    job_name, run_config = queue.job_run(str(op_config.get("kind", "enrich")), op_config)
    outcome = run_in_process(
        job_name,
        run_config,
        database_url=database_url,
        log_level=log_level,
        one_line_log=not debug,
    )
    if outcome.failure is not None:
        raise outcome.failure
    assert outcome.request_id is not None  # enrich_table planned one: the run succeeded
    store = Store(database_url)
    try:
        return store.get_request(outcome.request_id)
    finally:
        store.dispose()


def default_dagster_home() -> Path:
    """.glaze/dagster, created with a minimal dagster.yaml: the instance used without DAGSTER_HOME."""
    home = glaze_home() / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    return home


def dagster_instance() -> DagsterInstance:
    """$DAGSTER_HOME's instance when set, else a persistent one under .glaze/dagster."""
    from dagster import DagsterInstance

    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    return DagsterInstance.from_config(str(default_dagster_home()))


class _OneLinePerEvent(logging.Filter):
    """Each run event in one line, and no errors: Dagster logs a failed step, each step it then
    skips and the failed run at ERROR, stack traces included; the caller reports the failure
    itself, in one line (`run_failure`). `--debug` shows Dagster's own log instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return False
        lines = record.getMessage().strip().splitlines()
        record.msg, record.args = (lines[0] if lines else ""), ()
        return True


def one_line_run_logger() -> LoggerDefinition:
    """The `console` logger of a run a person watches: Dagster's format, one line per event."""
    from dagster import Field, LoggerDefinition

    def make(context: Any) -> logging.Logger:
        run_log = logging.Logger("dagster", level=context.logger_config["log_level"])
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s - dagster - %(levelname)s - %(message)s", "%Y-%m-%d %H:%M:%S %z"
            )
        )
        handler.addFilter(_OneLinePerEvent())
        run_log.addHandler(handler)
        return run_log

    return LoggerDefinition(
        make,
        config_schema={"log_level": Field(str, is_required=False, default_value="INFO")},
        description="One line per event on stderr; failures are reported by the CLI.",
    )


class RunCrashed(Exception):
    """The run failed on something that is not the caller's input (most likely a bug): the
    CLI reports it as an internal error under the original exception's name."""

    def __init__(self, type_name: str, message: str, run_id: str) -> None:
        super().__init__(f"{message} (run {run_id})")
        self.type_name = type_name


# What the ops raise when a service they need goes away: Dagster only keeps the class name.
_SERVICE_ERROR_NAMES = frozenset(
    {"OperationalError", "InterfaceError", "ConnectionError", "TimeoutError", "ConnectError"}
)


def run_failure(result: ExecuteInProcessResult) -> Exception:
    """The error to report for a failed in-process run: its first failed step's own message.

    Dagster wraps what a step raised (a `Failure`, retries exhausted, a step execution error);
    the person at the terminal wants the innermost message in one line, not 30 stack frames.
    A `Failure` is how the ops report a GlazeError (bad input, a cancel): a GlazeError here; an
    error the engine names (a GlazeError subclass) keeps its class; a lost service is a
    ServiceUnavailableError; anything else is RunCrashed (an internal error).
    """
    run = f"run {result.run_id}"
    failure = next((e for e in result.all_events if e.is_step_failure), None)
    data = failure.step_failure_data if failure is not None else None
    if data is None:
        return GlazeError(f"the enrich_table {run} failed")
    if data.user_failure_data is not None and data.user_failure_data.description:
        return GlazeError(f"{data.user_failure_data.description} ({run})")
    error = data.error
    while error is not None and error.cause is not None:
        error = error.cause  # innermost: what our code raised, under Dagster's wrappers
    if error is None:
        return GlazeError(f"the enrich_table {run} failed")
    message = error.message.strip()
    prefix = f"{error.cls_name}: "
    message = message[message.index(prefix) + len(prefix) :] if prefix in message else message
    glaze_class = _glaze_error_classes().get(error.cls_name or "")
    if glaze_class is not None:
        try:
            return glaze_class(f"{message} ({run})")
        except TypeError:  # a subclass that takes more than a message
            return GlazeError(f"{error.cls_name}: {message} ({run})")
    if error.cls_name in _SERVICE_ERROR_NAMES:
        return ServiceUnavailableError(
            f"the enrich_table {run} lost a service: {error.cls_name}: {message}"
        )
    return RunCrashed(error.cls_name or "Exception", message, result.run_id)


def _glaze_error_classes() -> dict[str, type[GlazeError]]:
    """GlazeError and every subclass loaded, by name."""
    found: dict[str, type[GlazeError]] = {}
    pending: list[type[GlazeError]] = [GlazeError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return found
