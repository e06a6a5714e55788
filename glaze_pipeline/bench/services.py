"""What a benchmark run talks to: the mock provider server as its own process, its config and
the bench providers file, Redis, and the peak memory of each process.

The mock runs as a separate process (`glaze mock-providers`) so that its CPU and memory are not
the pipeline's, and its `/_stats` counts every call it served: the provider call figures of the
benchmark come from there, never from the pipeline's own counters.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from glaze_pipeline.bench.stack import REPO, free_port
from glaze_pipeline.core.providers.json_api import JsonApiConfig
from glaze_pipeline.core.providers.registry import parse_providers
from glaze_pipeline.testing.mock_server import Latency, MockConfig, default_vendors

MOCK_PROVIDERS_FILE = REPO / "seed" / "providers.mock.yaml"
MIB = 1024 * 1024


def bench_mock_config(latency_ms: float) -> MockConfig:
    """The mock's default vendors (their fields, prices and miss rates), at a fixed latency."""
    vendors = {
        name: vendor.model_copy(update={"latency": Latency(kind="fixed", mean_ms=latency_ms)})
        for name, vendor in default_vendors().items()
    }
    return MockConfig(vendors=vendors, site_not_found_rate=0.0)


def bench_providers(mock_url: str, concurrency: int) -> dict[str, Any]:
    """seed/providers.mock.yaml pointed at `mock_url`, with limits that are not the bottleneck.

    Kept as in the file: vendors, fields, prices, confidence (the cheap vendor's 0.85 passes the
    0.8 threshold, but it has no revenue field, so a company needing revenue always falls
    through to premium), retries and breakers. Changed: the website provider is left out (it is
    disabled in the file too), premium needs no API key (the mock asks for none), and each
    vendor's `max_concurrency` is the job's concurrency, with no client-side rate limit.
    """
    document = yaml.safe_load(MOCK_PROVIDERS_FILE.read_text(encoding="utf-8"))
    providers = []
    for entry in document["providers"]:
        if entry.get("kind") != "json_api" or entry.get("enabled") is False:
            continue
        entry = dict(entry)
        entry.pop("auth", None)
        vendor = entry["base_url"].rstrip("/").rsplit("/", 1)[-1]
        entry["base_url"] = f"{mock_url}/{vendor}"
        http = dict(entry.get("http") or {})
        http.pop("rate_limit_per_s", None)
        http.pop("rate_limit_burst", None)
        http["max_concurrency"] = concurrency
        entry["http"] = http
        providers.append(entry)
    return {"providers": providers}


def provider_configs(document: Mapping[str, Any]) -> list[JsonApiConfig]:
    """The validated entries of a bench providers document."""
    entries = parse_providers(document, source="bench providers").providers
    return [entry for entry in entries if isinstance(entry, JsonApiConfig)]


def mock_vendor_of(config: JsonApiConfig) -> str:
    """Which mock vendor a provider entry calls (the last path segment of its base URL)."""
    return config.base_url.rstrip("/").rsplit("/", 1)[-1]


def peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident set (VmHWM), in MiB; None when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MIB
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU a live process has used (/proc/<pid>/stat), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class MockProcess:
    """`glaze mock-providers` running as its own process on a free port."""

    process: subprocess.Popen[bytes]
    url: str

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_stats", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def calls_by_vendor(self) -> dict[str, int]:
        """Provider calls served per vendor, counted per entity as a vendor bills them: a
        request per lookup, and each entity a batch request asked about (`lookups`; a mock
        without batch endpoints counts `requests` only, the same figure)."""
        return {name: vendor_lookups(v) for name, v in self.stats()["vendors"].items()}

    def requests_by_vendor(self) -> dict[str, int]:
        """HTTP requests served per vendor (a batch request is one)."""
        return {name: v["requests"] for name, v in self.stats()["vendors"].items()}

    def reset(self) -> None:
        httpx.post(f"{self.url}/_reset", timeout=10).raise_for_status()

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.process.pid)

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.process.pid)


def vendor_lookups(counters: Mapping[str, Any]) -> int:
    """One vendor's `/_stats` counters -> the entity lookups it served."""
    return int(counters.get("lookups", counters["requests"]))


@contextlib.contextmanager
def mock_process(workdir: Path, latency_ms: float, *, name: str = "mock") -> Iterator[MockProcess]:
    """Start the mock server in its own process; stop it (SIGTERM, then SIGKILL) on exit."""
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(bench_mock_config(latency_ms).model_dump(mode="json")))
    port = free_port()
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glaze_pipeline.cli",
            "mock-providers",
            "--port",
            str(port),
            "--config",
            str(config_path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    mock = MockProcess(process, f"http://127.0.0.1:{port}")
    try:
        _wait_healthy(mock, timeout_s=30)
        yield mock
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_healthy(mock: MockProcess, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if mock.process.poll() is not None:
            raise RuntimeError(f"the mock provider server exited ({mock.process.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{mock.url}/_health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the mock provider server did not answer within {timeout_s}s")


def flush_redis(url: str) -> None:
    """Empty the benchmark's Redis database (only that one: the URL names its number)."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def redis_peak_mib(url: str) -> float | None:
    """Redis's peak memory use (INFO memory), in MiB."""
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory_peak"]) / MIB
    except redis.RedisError:
        return None
    finally:
        client.close()
