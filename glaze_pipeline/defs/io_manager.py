"""Step hand-off: in memory for a run in one process, through the app database for a run whose
steps run in other processes or on other machines (multiprocess, Celery: see executors.py).

Dagster's default IO manager pickles outputs to the local disk of the run's instance, which a
Celery worker on another machine cannot read. For those runs this one keeps each output in the
`step_outputs` table (core/step_outputs.py) of the Glaze database, which every worker already
reaches; the outputs are small dataclasses (a plan, a span of rows with the entities it owns,
a chunk's figures), one row each. Rows are kept a week, for a re-execution from failure (which
reads the parent run's outputs), then purged by the next run that starts a step.

A run in process (the default executor) keeps its outputs in memory, as `execute_in_process`
always did: for the 10-row Leads job on SQLite the database hand-off costs ~5 rows written and
read, ~10 % of the job's ~100 ms. Its outputs are dropped when the run ends, so such a run is
re-executed whole, not from a failed step.
"""

import pickle
import time
from datetime import timedelta
from typing import Any

from dagster import ConfigurableIOManager, InitResourceContext, InputContext, OutputContext
from pydantic import Field, PrivateAttr

from glaze_pipeline.core import step_outputs
from glaze_pipeline.core.step_outputs import StepOutputKey
from glaze_pipeline.core.store import Store
from glaze_pipeline.defs.executors import selected_executor
from glaze_pipeline.defs.resources import GlazeDatabase

PURGE_EVERY_S = 3600.0
_last_purge = [float("-inf")]  # per process: one purge an hour is plenty


def output_key(context: OutputContext) -> StepOutputKey:
    return StepOutputKey(
        run_id=context.run_id,
        step_key=context.step_key,
        output_name=context.name,
        mapping_key=context.mapping_key or "",
    )


def in_one_process(context: InputContext | OutputContext) -> bool:
    """Whether every step of the run executes in the run's own process."""
    return selected_executor(context.step_context.run_config) == "in_process"


class StepOutputsIOManager(ConfigurableIOManager):
    """Step outputs in memory (a run in process), else pickled into the Glaze database
    (`glaze_db`'s URL), one row per output keyed by (run_id, step_key, output_name, mapping_key)."""

    glaze_db: GlazeDatabase
    retention_days: float = Field(
        default=step_outputs.RETENTION.days,
        description="Days a run's outputs are kept (re-execution from failure reads them).",
    )

    _store: Store | None = PrivateAttr(default=None)
    _memory: dict[StepOutputKey, Any] = PrivateAttr(default_factory=dict)

    def _opened(self) -> Store:
        if self._store is None:
            self._store = Store(self.glaze_db.resolved_url)
        return self._store

    def setup_for_execution(self, context: InitResourceContext) -> None:
        run = context.run
        if run is None or selected_executor(run.run_config) == "in_process":
            return  # nothing stored in the database: nothing to purge here
        if time.monotonic() - _last_purge[0] >= PURGE_EVERY_S:
            _last_purge[0] = time.monotonic()
            step_outputs.purge_older_than(self._opened(), timedelta(days=self.retention_days))

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # A run in process has ended: nobody reads its outputs again.
        run_id = context.run.run_id if context.run is not None else None
        for key in [key for key in self._memory if key.run_id == run_id]:
            del self._memory[key]
        if self._store is not None:
            self._store.dispose()
            self._store = None

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if in_one_process(context):
            self._memory[output_key(context)] = obj
            return
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        step_outputs.save(self._opened(), output_key(context), payload)

    def load_input(self, context: InputContext) -> Any:
        # The upstream output's own run: a re-execution reads its parent run's outputs.
        upstream = context.upstream_output
        assert upstream is not None  # an op's input from another op's output
        key = output_key(upstream)
        if in_one_process(context):
            try:
                return self._memory[key]
            except KeyError:
                raise step_outputs.StepOutputMissing(
                    f"no output {key} in this process: a run in process keeps its outputs in "
                    "memory, re-execute it whole"
                ) from None
        payload = step_outputs.load(self._opened(), key)
        return pickle.loads(payload)
