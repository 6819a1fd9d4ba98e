"""gunicorn configuration of the API: `gunicorn -c api/gunicorn_conf.py 'api:create_app()' ...`.

Why a config file: the hooks below must run in gunicorn's master process.
- Prometheus multiprocess mode: every API worker process writes its request
  metrics to its own file in PROMETHEUS_MULTIPROC_DIR, and /metrics (answered
  by any one of them) sums the files. The directory is prepared here, before
  any worker starts: created if missing and emptied of the files of a
  previous run (a temporary one, removed on exit, when the variable is not
  set). `child_exit` tells the client library a worker died.
- Logs: with logs.format json (the default), gunicorn's error and access logs
  and the app's own loggers write one JSON object per line.
Command-line options (bind, workers, threads, access log) still win over
this file. Only standard library, common.logs and common.settings are
imported here: the app itself is loaded in each worker, after the fork.
"""
import glob
import os
import shutil
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from common.logs import configure_logging, gunicorn_logger_class   # noqa: E402
from common.settings import load_settings   # noqa: E402

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_READY_ENV = "_SDQ_PROM_DIR_READY"     # set once per master: a config reload (HUP) keeps live files
_OWNED_ENV = "_SDQ_PROM_DIR_OWNED"     # a directory this file created, removed on exit


def _prepare_multiproc_dir() -> None:
    if os.environ.get(_READY_ENV) == "1":
        return
    path = os.environ.get(_MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="sdq-prometheus-")
        os.environ[_MULTIPROC_ENV] = path
        os.environ[_OWNED_ENV] = path
    os.environ[_READY_ENV] = "1"


_prepare_multiproc_dir()
_settings = load_settings()
configure_logging(_settings.logs.format, _settings.logs.level)
if _settings.logs.format == "json":
    logger_class = gunicorn_logger_class()


def child_exit(server, worker):
    """A worker process ended: its live gauges are dropped (counters and histograms are kept)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    owned = os.environ.get(_OWNED_ENV)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)
