"""Launch, watch and terminate Glaze's runs through Dagster's GraphQL API: `enrich_table`
(`launch_enrich`), and any job by name (`launch_run`: the AI jobs `table_suggestions`,
`column_suggestions`, `row_suggestions`, `table_generation`, whose first op takes the config).

The Glaze app is not Python, so the contract is the raw GraphQL below: the documents are
module constants, shown verbatim in `docs/graphql.md`, and this client is their reference
caller (and what the tests drive against a real `dagster-webserver`). It needs only httpx,
not dagster.

Every union result is mapped: a launched run returns its id; anything else raises a subclass
of `DagsterGraphQLError` that names the problem, so a caller can tell "fix the config"
(`RunConfigInvalidError`) from "wrong server or location" (`JobNotFoundError`) from "try again
later" (`GraphQLTransportError`). A launch is never retried: `launchRun` has no idempotency key,
and a second POST after a lost answer could start a second run. Status polls are safe to repeat.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

import httpx

from glaze_pipeline.core.queue import ENRICH_JOB, ENRICH_OP

DEFAULT_REPOSITORY = "__repository__"  # the repository a `Definitions` object becomes
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)  # launchRun validates config over gRPC

LAUNCH_RUN_MUTATION = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess {
      run { runId status }
    }
    ... on RunConfigValidationInvalid {
      pipelineName
      errors { __typename message path reason }
    }
    ... on PipelineNotFoundError {
      pipelineName repositoryName repositoryLocationName
    }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
    ... on PythonError { className stack }
    ... on Error { message }
  }
}
""".strip()

RUN_STATUS_QUERY = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status }
    ... on RunNotFoundError { message }
    ... on PythonError { message className stack }
  }
}
""".strip()

TERMINATE_RUN_MUTATION = """
mutation TerminateRun($runId: String!, $terminatePolicy: TerminateRunPolicy) {
  terminateRun(runId: $runId, terminatePolicy: $terminatePolicy) {
    __typename
    ... on TerminateRunSuccess {
      run { runId status }
    }
    ... on TerminateRunFailure {
      message
      run { runId status }
    }
    ... on RunNotFoundError { runId message }
    ... on UnauthorizedError { message }
    ... on PythonError { message className stack }
  }
}
""".strip()

RUNS_BY_TAGS_QUERY = """
query RunsByTags($tags: [ExecutionTag!], $limit: Int) {
  runsOrError(filter: {tags: $tags}, limit: $limit) {
    __typename
    ... on Runs {
      results { runId status jobName creationTime }
    }
    ... on InvalidPipelineRunsFilterError { message }
    ... on PythonError { message className stack }
  }
}
""".strip()

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation {
            name
            repositories { name jobs { name } }
          }
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
""".strip()


class RunStatus(StrEnum):
    """Dagster's `RunStatus` enum, as the API spells it."""

    QUEUED = "QUEUED"
    NOT_STARTED = "NOT_STARTED"
    MANAGED = "MANAGED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    SUSPENDED = "SUSPENDED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELING = "CANCELING"
    CANCELED = "CANCELED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED})


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
    """`PythonError`: the server raised while serving the call (stack kept for the log)."""

    def __init__(self, message: str, *, class_name: str | None, stack: list[str]) -> None:
        super().__init__(message, typename="PythonError")
        self.class_name = class_name
        self.stack = stack


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

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message, typename="RunNotFoundError")
        self.run_id = run_id


class RunWaitTimeoutError(DagsterGraphQLError, TimeoutError):
    """The run did not reach a terminal status in time (it is still going: not cancelled)."""

    def __init__(self, run_id: str, status: RunStatus | None, timeout_s: float) -> None:
        super().__init__(
            f"run {run_id} not finished after {timeout_s:g}s (last status: {status or 'unknown'})"
        )
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
    """The answer to `terminateRun`.

    `accepted` is True for `TerminateRunSuccess` (cancellation requested: wait for CANCELED).
    False is `TerminateRunFailure`: Dagster cancels only QUEUED and STARTED runs, so the run
    had finished (nothing to do) or was STARTING/NOT_STARTED (ask again in a moment);
    `status` (read by the server before acting) and `message` say which.
    """

    run_id: str
    accepted: bool
    status: RunStatus
    message: str | None = None


# -- the client --------------------------------------------------------------------------


class DagsterGraphQLClient:
    """A small synchronous client for the Dagster webserver's `/graphql` endpoint.

    `base_url` is the webserver root (with any `--path-prefix`) or its `/graphql` endpoint;
    `headers` carry auth where a deployment needs it (e.g. `Dagster-Cloud-Api-Token`);
    `transport` is injectable for tests. The code location is discovered from the workspace on
    first launch unless given.
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
        self._http = httpx.Client(timeout=timeout, headers=headers, transport=transport)
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
        self._http.close()

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
        run_config = {"ops": {ENRICH_OP: {"config": dict(op_config)}}}
        return self.launch_run(
            ENRICH_JOB,
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
        params = {
            "selector": {
                "repositoryLocationName": location.location_name,
                "repositoryName": location.repository_name,
                "jobName": location.job_name,
            },
            "runConfigData": dict(run_config),
            "executionMetadata": {
                "tags": [{"key": key, "value": value} for key, value in tags.items()]
            },
        }
        result = self._execute(LAUNCH_RUN_MUTATION, {"executionParams": params})["launchRun"]
        typename = _typename(result)
        if typename == "LaunchRunSuccess":
            return str(_get(result, "run", "runId"))
        raise _launch_error(typename, result, location)

    # -- watching and stopping -----------------------------------------------------------

    def run_status(self, run_id: str) -> RunStatus:
        """The run's current status (a `str` enum: QUEUED, STARTING, STARTED, SUCCESS, ...)."""
        result = self._execute(RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]
        typename = _typename(result)
        if typename == "Run":
            return _status(_get(result, "status"))
        if typename == "RunNotFoundError":
            raise RunNotFoundError(run_id, str(_get(result, "message")))
        raise _common_error(typename, result)

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
                if status.is_terminal:
                    return status
            if time.monotonic() >= deadline:
                raise RunWaitTimeoutError(run_id, status, timeout_s)
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    def terminate(self, run_id: str, *, force: bool = False) -> Termination:
        """Ask the run to stop (`SAFE_TERMINATE`); `force` marks it CANCELED at once.

        Both `TerminateRunSuccess` and `TerminateRunFailure` return a Termination (check
        `accepted`); an unknown run, no permission or a server error raise.
        """
        policy = "MARK_AS_CANCELED_IMMEDIATELY" if force else "SAFE_TERMINATE"
        result = self._execute(
            TERMINATE_RUN_MUTATION, {"runId": run_id, "terminatePolicy": policy}
        )["terminateRun"]
        typename = _typename(result)
        if typename == "TerminateRunSuccess":
            return Termination(run_id, True, _status(_get(result, "run", "status")))
        if typename == "TerminateRunFailure":
            return Termination(
                run_id,
                False,
                _status(_get(result, "run", "status")),
                str(_get(result, "message")),
            )
        if typename == "RunNotFoundError":
            raise RunNotFoundError(run_id, str(_get(result, "message")))
        raise _common_error(typename, result)

    def find_runs(self, tags: Mapping[str, str], *, limit: int = 10) -> list[RunRef]:
        """Runs carrying all these tags, newest first.

        `find_runs({"glaze/request": request_id})` answers "did my launch create a run?" after
        a GraphQLTransportError on `launchRun`, before launching again.
        """
        variables = {"tags": [{"key": k, "value": v} for k, v in tags.items()], "limit": limit}
        result = self._execute(RUNS_BY_TAGS_QUERY, variables)["runsOrError"]
        typename = _typename(result)
        if typename != "Runs":
            raise _common_error(typename, result)
        return [
            RunRef(
                run_id=str(_get(run, "runId")),
                status=_status(_get(run, "status")),
                job_name=str(_get(run, "jobName")),
                created=float(_get(run, "creationTime")),
            )
            for run in _get(result, "results")
        ]

    # -- discovery -----------------------------------------------------------------------

    def locate_job(
        self, job_name: str, *, repository_name: str = DEFAULT_REPOSITORY
    ) -> JobLocation:
        """Find the one loaded code location whose repository `repository_name` has the job.

        The location name depends on how the webserver was started (`-m glaze_pipeline.definitions`
        and `workspace.yaml` give `glaze_pipeline.definitions`; `dagster dev` reading
        pyproject.toml gives `glaze_pipeline`), so it is looked up, not assumed. Cached per
        client; the workspace query shows load errors, which `repositoriesOrError` hides.
        """
        key = (job_name, repository_name)
        if key in self._locations:
            return self._locations[key]
        workspace = self._execute(WORKSPACE_QUERY)["workspaceOrError"]
        typename = _typename(workspace)
        if typename != "Workspace":
            raise _common_error(typename, workspace)
        found: list[JobLocation] = []
        problems: list[str] = []
        for entry in _get(workspace, "locationEntries"):
            name = str(_get(entry, "name"))
            loaded = entry.get("locationOrLoadError")
            if loaded is None:
                problems.append(f"location {name} is {entry.get('loadStatus', 'not loaded')}")
            elif _typename(loaded) == "PythonError":
                problems.append(f"location {name} failed to load: {loaded.get('message', '')}")
            else:
                for repository in _get(loaded, "repositories"):
                    jobs = {job["name"] for job in _get(repository, "jobs")}
                    if repository.get("name") == repository_name and job_name in jobs:
                        found.append(JobLocation(name, repository_name, job_name))
        if len(found) > 1:
            names = ", ".join(location.location_name for location in found)
            raise CodeLocationError(
                f"job {job_name} is in several code locations ({names}): "
                "pass repository_location_name"
            )
        if not found:
            detail = f" ({'; '.join(problems)})" if problems else ""
            if problems:
                raise CodeLocationError(
                    f"no loaded code location has {repository_name}.{job_name}{detail}"
                )
            raise JobNotFoundError(f"no code location has job {repository_name}.{job_name}")
        self._locations[key] = found[0]
        return found[0]

    # -- transport -----------------------------------------------------------------------

    def _execute(self, document: str, variables: Mapping[str, Any] | None = None) -> Any:
        """POST one document; the `data` object, or a typed error."""
        try:
            response = self._http.post(
                self.endpoint, json={"query": document, "variables": dict(variables or {})}
            )
        except httpx.HTTPError as error:
            raise GraphQLTransportError(
                f"cannot reach {self.endpoint}: {type(error).__name__}: {error}"
            ) from error
        try:
            body = response.json()
        except ValueError:
            body = None
        # The webserver answers a bad document with HTTP 400 and a GraphQL `errors` list.
        if isinstance(body, dict) and body.get("errors"):
            messages = "; ".join(str(e.get("message", e)) for e in body["errors"])
            raise GraphQLQueryError(f"GraphQL errors from {self.endpoint}: {messages}")
        if response.is_error or not isinstance(body, dict) or not body.get("data"):
            raise GraphQLTransportError(
                f"unexpected answer from {self.endpoint}: HTTP {response.status_code} "
                f"{response.text[:300]!r}"
            )
        return body["data"]


def enrich_tags(op_config: Mapping[str, Any]) -> dict[str, str]:
    """The run tags the queue sensor sets too, so every launch path looks the same in Dagster.

    `glaze/request` is how the reconciler and the run-status sensors find a request's run.
    `glaze/enrich-table` is the per-table concurrency key (one `enrich` run per table where the
    instance limits it); estimate and pre-enrich runs write no cells and do not carry it.
    """
    kind = str(op_config.get("kind") or "enrich")
    tags = {"glaze/kind": kind}
    if op_config.get("table_id"):
        tags["glaze/table"] = str(op_config["table_id"])
        if kind == "enrich":
            tags["glaze/enrich-table"] = str(op_config["table_id"])
    if op_config.get("request_id"):
        tags["glaze/request"] = str(op_config["request_id"])
    return tags


# -- parsing -----------------------------------------------------------------------------


def _get(payload: Any, *keys: str) -> Any:
    """payload[k1][k2]...; a missing key means the answer is not what our document asked for."""
    value = payload
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise GraphQLQueryError(f"malformed answer: no {'.'.join(keys)} in {payload!r:.300}")
        value = value[key]
    return value


def _typename(payload: Any) -> str:
    return str(_get(payload, "__typename"))


def _status(value: Any) -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        raise GraphQLQueryError(f"unknown run status {value!r}") from None


def _common_error(typename: str, result: Mapping[str, Any]) -> DagsterGraphQLError:
    message = str(result.get("message") or typename)
    if typename == "PythonError":
        return DagsterPythonError(
            f"the Dagster server raised: {message.strip()}",
            class_name=result.get("className"),
            stack=list(result.get("stack") or []),
        )
    if typename == "UnauthorizedError":
        return UnauthorizedError(f"unauthorized: {message}", typename=typename)
    return DagsterGraphQLError(f"unexpected {typename}: {message}", typename=typename)


def _launch_error(
    typename: str, result: Mapping[str, Any], location: JobLocation
) -> DagsterGraphQLError:
    message = str(result.get("message") or typename).strip()
    match typename:
        case "RunConfigValidationInvalid":
            errors = tuple(
                ConfigError(
                    message=str(error.get("message", "")),
                    reason=str(error.get("reason", "")),
                    path=tuple(error.get("path") or ()),
                    typename=str(error.get("__typename", "")),
                )
                for error in _get(result, "errors")
            )
            return RunConfigInvalidError(str(result.get("pipelineName", location.job_name)), errors)
        case "PipelineNotFoundError":
            return JobNotFoundError(
                f"job not found: {message} (location {location.location_name!r}, "
                f"repository {location.repository_name!r})",
                typename=typename,
            )
        case "InvalidSubsetError":
            return InvalidSubsetError(f"invalid selection: {message}", typename=typename)
        case "RunConflict":
            return RunConflictError(f"run conflict: {message}", typename=typename)
        case "InvalidStepError":
            return RunLaunchError(
                f"invalid step key {result.get('invalidStepKey')!r}", typename=typename
            )
        case "InvalidOutputError":
            return RunLaunchError(
                f"invalid output {result.get('invalidOutputName')!r} "
                f"of step {result.get('stepKey')!r}",
                typename=typename,
            )
        case "PresetNotFoundError" | "ConflictingExecutionParamsError" | "NoModeProvidedError":
            return RunLaunchError(f"{typename}: {message}", typename=typename)
    return _common_error(typename, result)
