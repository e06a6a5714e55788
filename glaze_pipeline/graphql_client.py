"""Launch, watch and terminate Glaze's runs through Dagster's GraphQL API: `enrich_table`
(`launch_enrich`), and any job by name (`launch_run`: the AI jobs `table_suggestions`,
`column_suggestions`, `row_suggestions`, `table_generation`, whose first op takes the config).

A thin layer over dagster-graphql's `DagsterGraphQLClient`, which launches, reads a run's
status and terminates it. What this layer adds: the Glaze run config and tags, finding the code
location (and saying why a location cannot serve), finding runs by tag, waiting, and one small
exception hierarchy instead of the library's single error class, so a caller can tell "fix the
config" (`RunConfigInvalidError`) from "wrong server or location" (`JobNotFoundError`) from "try
again later" (`GraphQLTransportError`).

The Glaze app is not Python: its contract is the raw documents in `glaze_pipeline/graphql/`,
which docs/graphql.md shows and its test runs with curl. Two of them are also sent from here
(`workspace.graphql`, `runs_by_tags.graphql`), where the library has no call for the question.

A launch is never retried: `launchRun` has no idempotency key, and a second POST after a lost
answer could start a second run. Status polls are safe to repeat.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import dagster_graphql
import httpx
from dagster import DagsterRunStatus
from gql.transport.exceptions import (
    TransportConnectionFailed,
    TransportProtocolError,
    TransportQueryError,
    TransportServerError,
)
from gql.transport.httpx import HTTPXTransport

from glaze_pipeline.core.queue import job_run, tags_for

DEFAULT_REPOSITORY = "__repository__"  # the repository a `Definitions` object becomes
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)  # launchRun validates config over gRPC

RunStatus = DagsterRunStatus  # what the API answers: QUEUED, STARTING, STARTED, SUCCESS, ...
TERMINAL_STATUSES = frozenset({RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED})


@functools.cache
def graphql_document(name: str) -> str:
    """The text of `glaze_pipeline/graphql/<name>.graphql`, as the app sends it."""
    return resources.files("glaze_pipeline").joinpath("graphql", f"{name}.graphql").read_text()


# -- errors ------------------------------------------------------------------------------


class DagsterGraphQLError(Exception):
    """Base of everything this client raises; `typename` is the GraphQL result type, if any."""

    def __init__(self, message: str, *, typename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.typename = typename


class GraphQLTransportError(DagsterGraphQLError):
    """No usable answer: webserver unreachable, timed out, an HTTP 5xx or a non-JSON body."""


class GraphQLQueryError(DagsterGraphQLError):
    """The server rejected the document itself (top-level `errors`): a client/schema mismatch."""


class DagsterPythonError(DagsterGraphQLError):
    """`PythonError`: the server raised while serving the call."""


class UnauthorizedError(DagsterGraphQLError):
    """`UnauthorizedError`: the caller may not do this (Dagster+ / RBAC deployments)."""


class RunLaunchError(DagsterGraphQLError):
    """`launchRun` refused to create the run; nothing was launched."""


class RunConfigInvalidError(RunLaunchError):
    """`RunConfigValidationInvalid`: the run config does not match the job's config schema."""

    def __init__(self, job_name: str, errors: tuple[ConfigError, ...]) -> None:
        details = "; ".join(error.message for error in errors) or "no details"
        super().__init__(
            f"invalid run config for {job_name}: {details}", typename="RunConfigValidationInvalid"
        )
        self.job_name = job_name
        self.errors = errors


class JobNotFoundError(RunLaunchError):
    """`PipelineNotFoundError`, or no loaded code location holds the job."""


class InvalidSubsetError(RunLaunchError):
    """`InvalidSubsetError`: an op or asset selection that matches nothing in the job."""


class RunConflictError(RunLaunchError):
    """`RunConflict`: a run with this id already exists."""


class CodeLocationError(DagsterGraphQLError):
    """The job cannot be located: a location failed to load, is loading, or several match."""


class RunNotFoundError(DagsterGraphQLError):
    """`RunNotFoundError`: no run with this id in the instance."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} could not be found", typename="RunNotFoundError")
        self.run_id = run_id


class RunWaitTimeoutError(DagsterGraphQLError, TimeoutError):
    """The run did not reach a terminal status in time (it is still going: not cancelled)."""

    def __init__(self, run_id: str, status: RunStatus | None, timeout_s: float) -> None:
        shown = status.value if status else "unknown"
        super().__init__(f"run {run_id} not finished after {timeout_s:g}s (last status: {shown})")
        self.run_id = run_id
        self.status = status


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One entry of `RunConfigValidationInvalid.errors`."""

    message: str
    reason: str
    path: tuple[str, ...]
    typename: str


@dataclass(frozen=True, slots=True)
class JobLocation:
    """Where a job lives: the code location and repository names a selector needs."""

    location_name: str
    repository_name: str
    job_name: str


@dataclass(frozen=True, slots=True)
class RunRef:
    """A run found by its tags, newest first."""

    run_id: str
    status: RunStatus
    job_name: str
    created: float  # unix time


@dataclass(frozen=True, slots=True)
class Termination:
    """The answer to a termination request.

    `accepted` is True when cancellation was requested (wait for CANCELED); `status` is then
    the run's status read just after. False: Dagster cancels only QUEUED and STARTED runs, so
    the run had finished (nothing to do) or was STARTING/NOT_STARTED (ask again in a moment);
    `status` (the one the server refused on) and `message` say which.
    """

    run_id: str
    accepted: bool
    status: RunStatus
    message: str | None = None


# -- the client --------------------------------------------------------------------------


class DagsterGraphQLClient:
    """dagster-graphql's client for one webserver, with Glaze's launches and typed errors.

    `base_url` is the webserver root (with any `--path-prefix`) or its `/graphql` endpoint;
    `headers` carry auth where a deployment needs it (e.g. `Dagster-Cloud-Api-Token`);
    `transport` (an httpx transport) is injectable for tests. The code location is discovered
    from the workspace on first launch unless given.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:3000",
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.endpoint = root if root.endswith("/graphql") else root + "/graphql"
        url = urlsplit(self.endpoint)
        # The library's own requests-based transport takes host and port only; an httpx one
        # keeps our URL as given, timeouts and all. It opens a connection per call.
        self._dagster = dagster_graphql.DagsterGraphQLClient(
            url.netloc,
            transport=HTTPXTransport(
                url=self.endpoint, timeout=timeout, headers=dict(headers or {}), transport=transport
            ),
            use_https=url.scheme == "https",
        )
        self._locations: dict[tuple[str, str], JobLocation] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between calls; kept so callers can scope the client."""

    # -- launching -----------------------------------------------------------------------

    def launch_enrich(
        self,
        op_config: Mapping[str, Any],
        *,
        tags: Mapping[str, str] | None = None,
        repository_location_name: str | None = None,
        repository_name: str = DEFAULT_REPOSITORY,
    ) -> str:
        """Launch `enrich_table` with `op_config` as `detect_entities`' config; the run id.

        The Glaze tags (`glaze/table`, `glaze/request`, `glaze/kind`, `glaze/enrich-table`) are
        derived from the config; `tags` adds to or overrides them.
        """
        job_name, run_config = job_run("enrich", op_config)
        return self.launch_run(
            job_name,
            run_config,
            tags={**enrich_tags(op_config), **(tags or {})},
            repository_location_name=repository_location_name,
            repository_name=repository_name,
        )

    def launch_run(
        self,
        job_name: str,
        run_config: Mapping[str, Any],
        *,
        tags: Mapping[str, str] | None = None,
        repository_location_name: str | None = None,
        repository_name: str = DEFAULT_REPOSITORY,
    ) -> str:
        """Launch any job of the workspace; returns the new run's id or raises RunLaunchError."""
        discovered = repository_location_name is None
        location = (
            self.locate_job(job_name, repository_name=repository_name)
            if discovered
            else JobLocation(str(repository_location_name), repository_name, job_name)
        )
        try:
            return self._launch(location, run_config, tags or {})
        except JobNotFoundError:
            if not discovered:
                raise
            # The workspace changed since discovery (a reload renamed the location): nothing
            # was launched, so look again once and retry.
            self._locations.pop((job_name, repository_name), None)
            return self._launch(
                self.locate_job(job_name, repository_name=repository_name), run_config, tags or {}
            )

    def _launch(
        self, location: JobLocation, run_config: Mapping[str, Any], tags: Mapping[str, str]
    ) -> str:
        try:
            with self._answers():
                return str(
                    self._dagster.submit_job_execution(
                        location.job_name,
                        repository_location_name=location.location_name,
                        repository_name=location.repository_name,
                        run_config=run_config,
                        tags=dict(tags),
                    )
                )
        except dagster_graphql.DagsterGraphQLClientError as error:
            raise _launch_error(error, location) from error

    # -- watching and stopping -----------------------------------------------------------

    def run_status(self, run_id: str) -> RunStatus:
        """The run's current status."""
        try:
            with self._answers():
                return self._dagster.get_run_status(run_id)
        except dagster_graphql.DagsterGraphQLClientError as error:
            raise _run_error(error, run_id) from error

    def wait(self, run_id: str, timeout_s: float = 600.0, poll_s: float = 1.0) -> RunStatus:
        """Poll until the run is SUCCESS, FAILURE or CANCELED; that status.

        A poll that fails in transport (webserver restarting) is retried until the deadline;
        RunWaitTimeoutError when the deadline passes first.
        """
        deadline = time.monotonic() + timeout_s
        status: RunStatus | None = None
        while True:
            try:
                status = self.run_status(run_id)
            except GraphQLTransportError:
                if time.monotonic() >= deadline:
                    raise
            else:
                if status in TERMINAL_STATUSES:
                    return status
            if time.monotonic() >= deadline:
                raise RunWaitTimeoutError(run_id, status, timeout_s)
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    def terminate(self, run_id: str) -> Termination:
        """Ask the run to stop (`SAFE_TERMINATE`).

        Accepted or refused, the answer is a Termination (check `accepted`); an unknown run,
        no permission or a server error raise.
        """
        try:
            with self._answers():
                self._dagster.terminate_run(run_id)
        except dagster_graphql.DagsterGraphQLClientError as error:
            typename, message = _union_member(error)
            if typename != "TerminateRunFailure":
                raise _run_error(error, run_id) from error
            # The library keeps only the message, which names the status the server refused
            # on ("... due to having status STARTING."); a status read now may have moved on.
            refused_on = re.search(r"having status (\w+)", message)
            status = RunStatus(refused_on[1]) if refused_on else self.run_status(run_id)
            return Termination(run_id, False, status, message)
        return Termination(run_id, True, self.run_status(run_id))

    def find_runs(self, tags: Mapping[str, str], *, limit: int = 10) -> list[RunRef]:
        """Runs carrying all these tags, newest first.

        `find_runs({"glaze/request": request_id})` answers "did my launch create a run?" after
        a GraphQLTransportError on `launchRun`, before launching again.
        """
        variables = {"tags": [{"key": k, "value": v} for k, v in tags.items()], "limit": limit}
        result = self._query("runs_by_tags", variables, "runsOrError", expect="Runs")
        with self._answers():
            return [
                RunRef(
                    run_id=str(run["runId"]),
                    status=RunStatus(run["status"]),
                    job_name=str(run["jobName"]),
                    created=float(run["creationTime"]),
                )
                for run in result["results"]
            ]

    # -- discovery -----------------------------------------------------------------------

    def locate_job(
        self, job_name: str, *, repository_name: str = DEFAULT_REPOSITORY
    ) -> JobLocation:
        """Find the one loaded code location whose repository `repository_name` has the job.

        The location name depends on how the webserver was started (`-m glaze_pipeline.definitions`
        and `workspace.yaml` give `glaze_pipeline.definitions`; `dagster dev` reading
        pyproject.toml gives `glaze_pipeline`), so it is looked up, not assumed. Cached per
        client. The library finds it too, through `repositoriesOrError`, which silently leaves
        out a location that failed to load: the workspace query says why.
        """
        key = (job_name, repository_name)
        if key in self._locations:
            return self._locations[key]
        workspace = self._query("workspace", None, "workspaceOrError", expect="Workspace")
        found: list[JobLocation] = []
        problems: list[str] = []
        with self._answers():
            for entry in workspace["locationEntries"]:
                name = str(entry["name"])
                loaded = entry.get("locationOrLoadError")
                if loaded is None:
                    problems.append(f"location {name} is {entry.get('loadStatus', 'not loaded')}")
                elif loaded["__typename"] == "PythonError":
                    problems.append(f"location {name} failed to load: {loaded.get('message', '')}")
                else:
                    for repository in loaded["repositories"]:
                        jobs = {job["name"] for job in repository["jobs"]}
                        if repository["name"] == repository_name and job_name in jobs:
                            found.append(JobLocation(name, repository_name, job_name))
        if len(found) > 1:
            names = ", ".join(location.location_name for location in found)
            raise CodeLocationError(
                f"job {job_name} is in several code locations ({names}): "
                "pass repository_location_name"
            )
        if not found:
            if problems:
                raise CodeLocationError(
                    f"no loaded code location has {repository_name}.{job_name} "
                    f"({'; '.join(problems)})"
                )
            raise JobNotFoundError(f"no code location has job {repository_name}.{job_name}")
        self._locations[key] = found[0]
        return found[0]

    # -- transport -----------------------------------------------------------------------

    def _query(
        self, name: str, variables: dict[str, Any] | None, field: str, *, expect: str
    ) -> Any:
        """Send one of our documents; the result in `field`, a union member of type `expect`
        (any other raises). The library has no public call for a document of one's own, so
        this goes through its `_execute`."""
        with self._answers():
            result = self._dagster._execute(graphql_document(name), variables)[field]
            typename = str(result["__typename"])
            if typename != expect:
                raise _common_error(typename, str(result.get("message") or typename))
            return result

    @contextlib.contextmanager
    def _answers(self) -> Iterator[None]:
        """Name a transport failure or a malformed answer. The library raises one
        `DagsterGraphQLClientError` for everything, with the failure as its cause; one with
        no cause is a union member of the server's answer, left for the caller to map."""
        try:
            yield
        except dagster_graphql.DagsterGraphQLClientError as error:
            cause = error.__cause__
            if cause is None:
                raise
            if isinstance(cause, TransportConnectionFailed):
                reason = cause.__cause__ or cause  # httpx's own words
                raise GraphQLTransportError(
                    f"cannot reach {self.endpoint}: {type(reason).__name__}: {reason}"
                ) from reason
            if isinstance(cause, TransportServerError):
                raise GraphQLTransportError(
                    f"unexpected answer from {self.endpoint}: HTTP {cause.code}"
                ) from None
            if isinstance(cause, TransportProtocolError):  # a 2xx that is not GraphQL
                raise GraphQLTransportError(
                    f"unexpected answer from {self.endpoint}: {cause}"
                ) from None
            if isinstance(cause, TransportQueryError):  # HTTP 400 with `errors`
                messages = "; ".join(str(e.get("message", e)) for e in cause.errors or [])
                raise GraphQLQueryError(
                    f"GraphQL errors from {self.endpoint}: {messages or cause}"
                ) from None
            raise GraphQLQueryError(
                f"cannot send to {self.endpoint}: {type(cause).__name__}: {cause}"
            ) from cause
        except (KeyError, TypeError, ValueError) as error:
            # Not what the document asked for: another server, or another schema version.
            raise GraphQLQueryError(
                f"malformed answer from {self.endpoint}: {type(error).__name__}: {error}"
            ) from error


def enrich_tags(op_config: Mapping[str, Any]) -> dict[str, str]:
    """The run tags of a launch with this op config, the queue sensor's too (`queue.tags_for`)."""

    kind = op_config.get("kind") or "enrich"
    return tags_for(kind, op_config.get("table_id"), op_config.get("request_id"))


# -- the library's errors, typed ---------------------------------------------------------


def _union_member(error: dagster_graphql.DagsterGraphQLClientError) -> tuple[str, Any]:
    """(typename, detail): the library raises `DagsterGraphQLClientError(typename, detail)`
    for an answer other than success, the detail a message, a list of config errors or, for
    `InvalidOutputError`, its `body`."""
    typename = str(error.args[0]) if error.args else "Error"
    detail = error.args[1] if len(error.args) > 1 else error.body
    return typename, detail


def _common_error(typename: str, message: str) -> DagsterGraphQLError:
    if typename == "PythonError":
        return DagsterPythonError(
            f"the Dagster server raised: {message.strip()}", typename=typename
        )
    if typename == "UnauthorizedError":
        return UnauthorizedError(f"unauthorized: {message}", typename=typename)
    return DagsterGraphQLError(f"unexpected {typename}: {message}", typename=typename)


def _run_error(
    error: dagster_graphql.DagsterGraphQLClientError, run_id: str
) -> DagsterGraphQLError:
    typename, message = _union_member(error)
    if typename in ("RunNotFoundError", "PipelineRunNotFoundError"):
        return RunNotFoundError(run_id)
    return _common_error(typename, str(message))


def _launch_error(
    error: dagster_graphql.DagsterGraphQLClientError, location: JobLocation
) -> DagsterGraphQLError:
    typename, detail = _union_member(error)
    message = str(detail).strip()
    match typename:
        case "RunConfigValidationInvalid" | "PipelineConfigValidationInvalid":
            errors = tuple(
                ConfigError(
                    message=str(entry.get("message", "")),
                    reason=str(entry.get("reason", "")),
                    path=tuple(entry.get("path") or ()),
                    typename=str(entry.get("__typename", "")),
                )
                for entry in detail
            )
            return RunConfigInvalidError(location.job_name, errors)
        case "PipelineNotFoundError" | "JobNotFoundError":
            return JobNotFoundError(
                f"job not found: {message} (location {location.location_name!r}, "
                f"repository {location.repository_name!r})",
                typename=typename,
            )
        case "InvalidSubsetError":
            return InvalidSubsetError(f"invalid selection: {message}", typename=typename)
        case "RunConflict" | "PipelineRunConflict":
            return RunConflictError(f"run conflict: {message}", typename=typename)
        case "InvalidStepError":
            return RunLaunchError(f"invalid step key {message!r}", typename=typename)
        case "InvalidOutputError":
            return RunLaunchError(
                f"invalid output {detail.invalid_output_name!r} of step {detail.step_key!r}",
                typename=typename,
            )
        case "PresetNotFoundError" | "ConflictingExecutionParamsError" | "NoModeProvidedError":
            return RunLaunchError(f"{typename}: {message}", typename=typename)
    return _common_error(typename, message)
