"""Long-running services: the push launcher, the HTTP API, the stand-ins for the vendors and
the LLM (loopback only), and the providers' preflight (`launcher`, `serve`, `mock-providers`,
`mock-llm`, `providers`)."""

from __future__ import annotations

import json
import os
import socket

import click

from glaze_pipeline.cli.context import check_run_services, command_store, console, safe_url
from glaze_pipeline.cli.options import MAX_RUNS, FiniteFloatRange
from glaze_pipeline.cli.rendering import render_providers
from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.settings import CELERY_BROKER_ENV, DEFAULT_CELERY_BROKER


@click.command()
@click.option(
    "--graphql-url",
    default=None,
    help="Submit runs through Dagster's GraphQL API (e.g. http://127.0.0.1:3000/graphql).",
)
@MAX_RUNS
@click.option(
    "--poll",
    type=FiniteFloatRange(min=0, min_open=True),
    default=0.5,
    show_default=True,
    help="Catch-up interval (s).",
)
@click.pass_context
def launcher(ctx: click.Context, graphql_url: str | None, max_runs: int, poll: float) -> None:
    """Launch queued requests as they land (LISTEN/NOTIFY on Postgres), ahead of the sensor.

    By default each run executes in a child forked from this already-warm process (a real
    Dagster run in $DAGSTER_HOME's instance, else .glaze/dagster's); with --graphql-url it is
    submitted to Dagster. A database restart is waited out: it reconnects and catches up.
    """
    import logging
    import signal
    import threading

    from glaze_pipeline.launcher import check_database, fork_launch, graphql_launch, run_launcher
    from glaze_pipeline.runner import default_dagster_home

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for chatty in ("alembic", "httpx"):  # Dagster's instance migrations; each GraphQL POST
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # At start, whatever it needs must answer (one line and exit 2 if not); once running, an
    # outage is logged and waited out.
    store = command_store(ctx)
    check_database(store)
    if graphql_url:
        starter = graphql_launch(graphql_url)  # Dagster's runs use Dagster's environment
        how = f"via {graphql_url}"
    else:
        check_run_services()  # the forked runs use ours
        if not os.environ.get("DAGSTER_HOME"):  # the children open DagsterInstance.get()
            os.environ["DAGSTER_HOME"] = str(default_dagster_home())
        starter = fork_launch(ctx.obj.get("database_url"), max_runs=max_runs)
        how = (
            f"in forked workers (at most {max_runs} at once), "
            f"runs recorded in {os.environ['DAGSTER_HOME']}"
        )
    console.print(f"launching queued requests from {safe_url(store)} {how}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        run_launcher(store, starter, stop, poll)
    finally:
        starter.close()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--no-launcher",
    is_flag=True,
    help="Serve the API only (the queue sensor or a separate `glaze launcher` runs the jobs).",
)
@MAX_RUNS
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, no_launcher: bool, max_runs: int) -> None:
    """Serve the HTTP API and the grid page, with the push launcher beside it.

    Without an API key (GLAZE_API_KEYS or GLAZE_API_KEYS_FILE) it is open and listens on
    loopback only; with keys it prints a one-time sign-in link for the page.
    """
    from glaze_pipeline.api.server import ServeOptions
    from glaze_pipeline.api.server import serve as run_server
    from glaze_pipeline.runner import default_dagster_home

    database_url = ctx.obj.get("database_url")
    if not no_launcher:
        check_run_services()
        if not os.environ.get("DAGSTER_HOME"):  # the launcher's runs open DagsterInstance.get()
            os.environ["DAGSTER_HOME"] = str(default_dagster_home())
    options = ServeOptions(
        host=host,
        port=port,
        launcher=not no_launcher,
        max_runs=max_runs,
        database_url=database_url,
    )
    # soft_wrap: the sign-in link must stay one line, whatever the terminal's width
    run_server(options, announce=lambda line: console.print(line, soft_wrap=True, markup=False))


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the server says where it listens: a port in use is
    one line (ConfigError), not uvicorn's exit 3."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener


@click.command("mock-providers")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option("--config", "config_file", default=None, help="Mock config (YAML or JSON).")
def mock_providers(host: str, port: int, config_file: str | None) -> None:
    """Serve the mock provider APIs (real HTTP on loopback) for development and benchmarks."""
    import yaml

    from glaze_pipeline.testing.mock_server import load_mock_config, serve

    try:
        config = load_mock_config(config_file)
    except (OSError, ValueError, yaml.YAMLError) as error:  # missing, bad JSON/YAML or fields
        raise ConfigError(f"cannot use mock config {config_file}: {error}") from error
    listener = _listen(host, port)
    console.print(f"mock providers on http://{host}:{port} (stats: /_stats, reset: POST /_reset)")
    try:
        serve(host, port, config, sock=listener)
    finally:
        listener.close()


@click.command("mock-llm")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8766, show_default=True)
@click.option("--api-key", default=None, help="Answer 401 unless this bearer key is sent.")
def mock_llm(host: str, port: int, api_key: str | None) -> None:
    """Serve a local OpenAI-compatible LLM stand-in with deterministic answers (loopback)."""
    from glaze_pipeline.testing.mock_llm import serve

    listener = _listen(host, port)
    console.print(
        f"mock LLM on http://{host}:{port}/v1 (set GLAZE_LLM_BASE_URL to it; stats: /_stats)"
    )
    try:
        serve(host, port, api_key=api_key, sock=listener)
    finally:
        listener.close()


@click.command()
@click.option(
    "--config", "config_file", default=None, help="Providers YAML (else GLAZE_PROVIDERS_FILE)."
)
@click.option(
    "--no-probe",
    is_flag=True,
    help="Skip the vendors' health probes (check configuration, keys and circuits only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, for scripts.")
def providers(config_file: str | None, no_probe: bool, as_json: bool) -> None:
    """List the providers of the waterfall: entity, fields, cost per call, health, and whether
    each can be used now (the preflight a job runs before it spends)."""
    from glaze_pipeline.core.preflight import check_providers
    from glaze_pipeline.core.providers.registry import describe_providers, load_providers

    loaded = load_providers(config_file)
    described = describe_providers(loaded, check_providers(loaded, probe=not no_probe))
    if as_json:
        click.echo(json.dumps([d.as_dict() for d in described], indent=2))
        return
    console.print(render_providers(described))


@click.command()
@click.option(
    "--broker",
    envvar=CELERY_BROKER_ENV,
    default=DEFAULT_CELERY_BROKER,
    show_default=True,
    help="Celery broker URL (also GLAZE_CELERY_BROKER); the runs' `celery: broker:` must match.",
)
@click.option(
    "--backend",
    envvar="GLAZE_CELERY_BACKEND",
    default="rpc://",
    show_default=True,
    help="Celery result backend (also GLAZE_CELERY_BACKEND).",
)
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    help="Queue(s) to take steps from (default: dagster-celery's `dagster`); a run names its "
    "queue with `config_source: {task_default_queue: NAME}`.",
)
@click.option("--name", "-n", default=None, help="Node name (default: glaze-<pid>@<host>).")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Steps this worker runs at once (default: one per core).",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker(
    broker: str,
    backend: str,
    queues: tuple[str, ...],
    name: str | None,
    concurrency: int | None,
    loglevel: str,
) -> None:
    """Run a Celery worker that executes Dagster steps of runs using the `celery` executor.

    The worker runs steps of any run on the broker's queue: it needs this package installed,
    the app database (GLAZE_DATABASE_URL), the Dagster instance's storage (Postgres, with the
    env its dagster.yaml reads) and the same providers/Redis settings as the run. It is
    dagster-celery's `execute_plan` task, preloaded with glaze_pipeline.defs.warm so that
    each step starts warm. See docs/scaling.md.
    """
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    import glaze_pipeline.defs.warm  # noqa: F401 - preloaded: the pool's children fork warm

    check_run_services()  # the providers file loads, a configured Redis answers
    config_source = {"task_default_queue": queues[0]} if queues else None
    app = make_app(
        CeleryExecutor.for_cli(
            broker=broker, backend=backend, config_source=config_source
        ).app_args()
    )
    create_task(app)  # registers `execute_plan`, the task the executor sends per step
    argv = ["worker", "--loglevel", loglevel, "--prefetch-multiplier=1", "--without-gossip"]
    argv += ["-n", name or f"glaze-{os.getpid()}@%h"]
    for queue in queues or ("dagster",):
        argv += ["-Q", queue]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    console.print(
        f"celery worker on {safe_broker(broker)}, queue(s) {', '.join(queues or ('dagster',))}"
    )
    app.worker_main(argv)


def safe_broker(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
