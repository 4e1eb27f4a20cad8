"""The calibration cache: the step plans `tuning.calibrate` chose, per model, device, dtype and library version,
in the user's cache directory.

A missing, stale or unreadable cache file, or an entry that is no plan calibration could have chosen for this
model, means "calibrate again", never an error. Writers take a lock and merge, so concurrent runs keep each other's
entries. A plan whose steps then run far faster than calibrated was measured on a busy machine: it is measured
again, once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .tuning import StepPlan, shape_name

CALIBRATION_VERSION = 6
CACHE_FILE = "calibration.json"
# After a generation, a shape that took at least DRIFT_MIN_STEPS steps whose recent median wall time is below its
# calibrated cost / DRIFT_FACTOR was calibrated on a busy machine. Only this direction: host work and a machine
# busy now make decoding's steps slower than calibrated, never faster. What else makes them faster (a shorter
# engine or prompt) moves them by less than twice; compiled steps may move them more, which is why a plan is
# measured again only once.
DRIFT_FACTOR, DRIFT_MIN_STEPS = 2.0, 16

logger = logging.getLogger(__name__)


def cache_directory() -> Path:
    """The library's cache directory: $LOOKAHEAD_CACHE_DIR, else the user's cache directory (platformdirs)."""
    import platformdirs

    return Path(os.environ.get("LOOKAHEAD_CACHE_DIR") or platformdirs.user_cache_dir("lookahead-decoding"))


def cache_path() -> Path:
    """The calibration file, in `cache_directory()`."""
    return cache_directory() / CACHE_FILE


def calibration_key(model, engine: str) -> str:
    """What a plan depends on: the model (name and architecture), the device, the dtype, the engine, the versions."""
    import transformers

    device = model.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    architecture = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    parts = [getattr(model, "name_or_path", "") or type(model).__name__, architecture, device_name,
             str(model.dtype), engine, f"torch {torch.__version__}", f"transformers {transformers.__version__}",
             f"calibration {CALIBRATION_VERSION}"]
    return " | ".join(parts)


def read_cache(path: Path) -> dict:
    """The cache file's entries; {} for a missing, unreadable or foreign file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION or not isinstance(data.get("plans"), dict):
        return {}
    return data["plans"]


# Plans read from or written to the cache whose steps are checked for drift, and where their entry is; keys whose
# plan drifted (measured again on their next use) and keys measured again (never dropped again: what still runs
# far faster than a fresh calibration is not the load at calibration time, and would be measured on every call).
_drift_checked: dict[StepPlan, tuple[str, Path]] = {}
_stale_keys: set[str] = set()
_remeasured_keys: set[str] = set()


def is_stale(key: str) -> bool:
    """Whether the plan under `key` drifted from its steps' times in this process and must be measured again."""
    return key in _stale_keys


def cached_plan(key: str, context_length: int | None, path: Path | None = None) -> StepPlan | None:
    """The plan cached under `key`, if it is one calibration could have chosen for a model of `context_length`
    tokens and it has not drifted; a bad entry is dropped with a warning."""
    path = path or cache_path()
    entry = read_cache(path).get(key)
    if key in _stale_keys or entry is None or isinstance(entry, dict) and entry.get("stale"):
        return None
    try:
        plan = StepPlan.from_dict(entry)
        plan.check_calibrated(context_length)
    except (TypeError, ValueError) as err:
        logger.warning("lookahead: ignoring the step plan cached for this model in %s (%s); measuring it again",
                       path, err)
        return None
    if entry.get("remeasured"):
        _remeasured_keys.add(key)
    elif key not in _remeasured_keys:
        _drift_checked[plan] = (key, path)
    return plan


def store_plan(key: str, plan: StepPlan, path: Path | None = None) -> None:
    """Add the plan to the cache file; a cache that cannot be written only costs a calibration next time."""
    path = path or cache_path()
    if key in _stale_keys:
        _stale_keys.discard(key)
        _remeasured_keys.add(key)

    def add(plans: dict) -> None:
        previous = plans.get(key)
        if isinstance(previous, dict) and previous.get("stale"):  # another process saw it drift
            _remeasured_keys.add(key)
        plans[key] = {**plan.as_dict(), "remeasured": True} if key in _remeasured_keys else plan.as_dict()

    update_cache(path, add)
    if key not in _remeasured_keys:
        _drift_checked[plan] = (key, path)


def check_drift(plan: StepPlan, costs_ms: Sequence[float], steps: Sequence[int],
                recent_ms: Sequence[Sequence[float]]) -> None:
    """After a generation with `plan` that took `steps` steps of each shape calibrated at `costs_ms` (the plan's
    costs, or its greedy ones), the recent ones taking `recent_ms`: if the plan came from the cache and a shape ran
    far faster than calibrated, mark its entry stale, so its next use measures again."""
    where = _drift_checked.get(plan)
    if where is None:
        return
    for shape, cost, count, times in zip(plan.shapes, costs_ms, steps, recent_ms):
        # A shape that ran early in a batch and not since has no recent times (they expire): it tells nothing.
        if count >= DRIFT_MIN_STEPS and times and statistics.median(times) * DRIFT_FACTOR < cost:
            key, path = where
            del _drift_checked[plan]
            _stale_keys.add(key)
            logger.warning("lookahead: %s steps took %.2f ms, not the %.2f ms calibrated (on a busy machine?); "
                           "measuring the step plan again", shape_name(shape), statistics.median(times), cost)

            def mark_stale(plans: dict) -> None:
                if plans.get(key) == plan.as_dict():  # not a newer plan another process stored meanwhile
                    plans[key] = {**plans[key], "stale": True}

            update_cache(path, mark_stale)
            return


def update_cache(path: Path, change: Callable[[dict], None]) -> None:
    """Apply `change` to the cache file's entries, under a lock (concurrent writers keep each other's entries),
    replacing the file atomically (a concurrent reader sees the old file or the new one). A failure only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_name(path.name + ".lock")):
            for leftover in path.parent.glob(f"{path.stem}.*.tmp"):  # of writers that died (or failed, before)
                with contextlib.suppress(OSError):
                    leftover.unlink()
            plans = read_cache(path)
            change(plans)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f"{path.stem}.",
                                             suffix=".tmp", delete=False) as temporary:
                try:
                    json.dump({"version": CALIBRATION_VERSION, "plans": plans}, temporary, indent=1)
                    temporary.close()
                    os.replace(temporary.name, path)
                except BaseException:
                    os.unlink(temporary.name)
                    raise
    except OSError as err:
        logger.warning("lookahead: could not write the calibration cache %s (%s); set LOOKAHEAD_CACHE_DIR to a "
                       "writable folder, or step plans are measured again in every process", path,
                       err.strerror or err)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created, and kept: removing it would let two writers lock two files)."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock
