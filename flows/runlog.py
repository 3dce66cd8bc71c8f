"""Where a run's log lines go.

- The run log file (:func:`capture`): every INFO line of Prefect and Dask in this process, for this run,
  in the file that :func:`tasks.store.run_log_path` names (next to the output, or in ``$DOGFLOW_LOG_DIR``).
- The terminal (:func:`quiet_terminal`): ``dogflow run`` shows only warnings and errors of Prefect and
  Dask (plus its own progress bar and summary line); ``-v`` shows their INFO lines too. Dask worker
  processes inherit the setting through the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from tasks import store

LOGGERS = ("prefect", "distributed")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def capture(output_path: str, run_name: str | None) -> Iterator[Path]:
    """Copy this run's Prefect and Dask log lines (INFO and up) into the run log file; yields its path."""
    path = store.run_log_path(output_path, run_name or "run", os.environ.get("SLURM_JOB_ID"),
                              folder=os.environ.get("DOGFLOW_LOG_DIR") or None)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield path
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def quiet_terminal(verbose: bool) -> None:
    """Console output of Prefect and Dask: warnings and errors only, unless ``verbose``.

    Prefect's console handler level is set through its environment override (inherited by Dask worker
    processes); Dask's own stream handlers are raised to WARNING, and the loggers stay at INFO so the
    run log file and the Prefect API still get every line.
    """
    level = "INFO" if verbose else "WARNING"
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = level
    for name in ("", "distributed"):  # Prefect's console handler sits on the root logger
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(level)
    logging.getLogger("distributed").setLevel(logging.INFO)
