"""Provider preflight: which providers can be used now, known before a job spends anything.

Each provider that has a `preflight` checks itself (configuration, credentials, circuit, and a
free health probe where its vendor offers one); one that has none runs in process and is
usable. The CLI, the estimate and the job all ask here, so they show the same verdicts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterable, Mapping

from glaze_pipeline.core.providers.base import ChecksItself, Provider, Verdict

# A provider's own probe has a short timeout; this bounds a preflight that has none.
PREFLIGHT_TIMEOUT_S = 15.0


def check_providers(
    providers: Iterable[Provider], *, probe: bool = True, timeout_s: float = PREFLIGHT_TIMEOUT_S
) -> dict[str, Verdict]:
    """Every provider's verdict by name, checked concurrently; never raises for one
    provider's fault. Callable from sync code, with or without a running event loop in this
    thread (then it runs in a thread of its own, so the caller's loop is not re-entered)."""
    providers = list(providers)

    def run() -> list[Verdict]:
        return asyncio.run(_check_all(providers, probe=probe, timeout_s=timeout_s))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        verdicts = run()
    else:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="preflight") as pool:
            verdicts = pool.submit(run).result()
    return {verdict.provider: verdict for verdict in verdicts}


def unusable(verdicts: Mapping[str, Verdict]) -> dict[str, str]:
    """The providers that cannot be used, name -> why (what the waterfall skips)."""
    return {
        name: verdict.reason or "unavailable"
        for name, verdict in verdicts.items()
        if not verdict.usable
    }


async def _check_all(providers: list[Provider], *, probe: bool, timeout_s: float) -> list[Verdict]:
    return list(await asyncio.gather(*(_check(p, probe, timeout_s) for p in providers)))


async def _check(provider: Provider, probe: bool, timeout_s: float) -> Verdict:
    name = provider.name
    if not isinstance(provider, ChecksItself):
        return Verdict(name, True, checks=("in process",))
    try:
        async with asyncio.timeout(timeout_s):
            verdict = await provider.preflight(probe=probe)
    except TimeoutError:
        return Verdict(name, False, f"preflight gave no verdict within {timeout_s:g}s")
    except Exception as error:  # one provider's fault is its own verdict, not everyone's
        return Verdict(name, False, f"preflight failed: {type(error).__name__}: {error}")
    if not isinstance(verdict, Verdict):
        return Verdict(name, False, f"preflight returned {type(verdict).__name__}, not a Verdict")
    return verdict
