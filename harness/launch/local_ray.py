"""Ray for a sweep: join a cluster (`--address`), or start an embedded local Ray on 127.0.0.1 with token
authentication; the Ray Train switches every trial runs with; how many trials the cluster fits.

Private Ray APIs used here (an upper bound on `ray` in pyproject.toml names them): ray._private.
ray_constants.ENABLE_RAY_CLUSTER (the loopback-only embedded Ray), ray._raylet's auth-token cache
reset, and ray.data's autoscaling coordinator (pre-warmed); each fails soft or is a one-line fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harness.config import TrialConfig
from harness.errors import UserError


# Ray Train V2 starts several helper actors per trial, each a fresh Python process (about a second of
# CPU apiece before it does anything). These switches drop the ones a ditscale trial does not use:
# the preemption watcher (node draining on autoscaled clouds; Slurm preemption goes through the stop
# file instead), the metrics callbacks (Prometheus export) and the per-trial working directory
# (paths are absolute already). The controller polls its workers every 2 s by default; 0.2 s lets a
# short trial start and end sooner.
_RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}


def runtime_env() -> dict:
    env = {k: os.environ.get(k, v) for k, v in _RAY_TRAIN_ENV.items()}
    return {"env_vars": env}


RAY_AUTH_ENV = "DITSCALE_RAY_AUTH"  # token (default) | disabled: the embedded local Ray's authentication
_RAY_AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_embedded_auth: dict = {}  # what start_ray set up for the embedded Ray's token; stop_ray undoes it


def _refresh_ray_auth() -> None:
    """Ray caches its auth mode and token per process: make it read them again (e.g. the second sweep of
    one process gets a new token). Private Ray API: without it only a second in-process sweep is affected."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:
        pass


def _embedded_ray_auth() -> None:
    """Token authentication for the embedded local Ray (any local user can reach its loopback ports):
    a fresh random token per sweep, in a private folder (0700, the file 0600) that Ray's GCS, raylet and
    workers find through RAY_AUTH_TOKEN_PATH, inherited from this process. The token is never printed nor
    logged; the folder goes when the Ray does. A RAY_AUTH_TOKEN[_PATH] of the user's (for joining other
    clusters) is set aside meanwhile. DITSCALE_RAY_AUTH=disabled turns authentication off."""
    import secrets

    mode = os.environ.get(RAY_AUTH_ENV, "token").strip().lower() or "token"
    if mode not in ("token", "disabled"):
        raise UserError(f"{RAY_AUTH_ENV}={mode!r}: use token or disabled")
    _embedded_auth["env"] = {key: os.environ.pop(key, None) for key in _RAY_AUTH_KEYS}
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token":
        folder = tempfile.mkdtemp(prefix="ditscale-ray-auth-")  # mode 0700
        _embedded_auth["folder"] = folder
        path = Path(folder) / "token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    _refresh_ray_auth()


def stop_ray() -> None:
    """Stop the embedded Ray; remove its token and restore the auth variables it replaced."""
    import shutil

    import ray

    try:
        ray.shutdown()
    finally:
        folder = _embedded_auth.pop("folder", None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        for key, value in _embedded_auth.pop("env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _refresh_ray_auth()


def start_ray(address: str | None) -> bool:
    """Join `address`, or start an embedded local Ray on 127.0.0.1 with token authentication (a fresh
    token per sweep; _embedded_ray_auth). Returns True if we started it (stop it with stop_ray)."""
    for key, value in runtime_env()["env_vars"].items():
        os.environ.setdefault(key, value)  # the driver-side Tune/Train code reads them too
    if not address:
        # Ray resolves 127.0.0.1 to the machine's routable address unless it believes clusters are
        # off (its laptop mode): that keeps the embedded Ray on the loopback interface.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import ray._private.ray_constants as ray_constants

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env())
        return False
    ray_constants.ENABLE_RAY_CLUSTER = False
    _embedded_ray_auth()
    try:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
                 configure_logging=False, runtime_env=runtime_env())
    except BaseException:
        stop_ray()
        raise
    _prewarm_autoscaling_coordinator()
    return True


def _prewarm_autoscaling_coordinator() -> None:
    """Each Train controller first sends its resource request to a cluster-wide coordinator actor and
    waits up to 5 s for it; on a fresh cluster the first trial pays for that actor's process start
    and times out. Creating it now overlaps its start with the first Tune trial's. (Private Ray API:
    if it moves, the only loss is those seconds.)"""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:
        pass


def max_concurrent_trials(trials: list[TrialConfig], requested: int | None) -> int:
    import ray

    if requested:
        return requested
    total = ray.cluster_resources()
    fits = []
    for trial in trials:
        r = trial.resources
        n = int(total.get("CPU", 0) // (r.cpus_per_worker * r.workers_per_trial))
        if r.gpus_per_worker:
            n = min(n, int(total.get("GPU", 0) // (r.gpus_per_worker * r.workers_per_trial)))
        fits.append(n)
    n = min(fits) if fits else 1
    if n < 1:
        t = trials[0].resources
        raise UserError(
            f"resources: a trial needs {t.workers_per_trial} workers x {t.cpus_per_worker} CPU"
            f"{f' + {t.gpus_per_worker} GPU' if t.gpus_per_worker else ''}; the Ray cluster has {dict(total)}")
    return n
