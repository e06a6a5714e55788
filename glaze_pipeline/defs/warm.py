"""What every step process needs before its first line of work, loaded once in the process its
step processes fork from: the multiprocess executor's fork server (`executors.PRELOAD`) and a
Celery worker's parent (`glaze worker`).

The definitions alone left each step process importing the Dagster instance's storage
(`create_instance_from_ref`), the Postgres driver and tldextract, and parsing the Public Suffix
List: ~0.5 s of CPU per step, 12 % of a multiprocess S3's step CPU at scale 0.2 (py-spy, 15
step processes). Modules and parsed data only: no connection is opened here, none is forked.
Then it freezes what it loaded (`heap.freeze_before_fork`).
"""

# Imported to be loaded (here, once), not used here.
import dagster._core.instance.factory
import dagster._core.secrets.env_file
import dagster._core.storage.defs_state.blob_storage_state_storage
import dagster._core.storage.event_log.sqlite
import dagster._core.storage.local_compute_log_manager
import dagster._core.storage.migration.utils
import dagster._core.storage.root
import dagster._core.storage.runs.sqlite
import dagster._core.storage.schedules.sqlite
import dagster._core.storage.sqlite_storage  # noqa: F401
import dagster_postgres  # noqa: F401
import psycopg  # noqa: F401
import upath.implementations.local  # noqa: F401

import glaze_pipeline.definitions  # noqa: F401
from glaze_pipeline.core import detection
from glaze_pipeline.core.heap import freeze_before_fork

detection.load_suffix_list()
freeze_before_fork()
