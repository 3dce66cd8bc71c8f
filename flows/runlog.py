"""Where a run's log lines go.

- The run log file (:func:`capture`): every INFO line of Prefect and Dask in this process, for this run,
  in the file that :meth:`tasks.output.Output.log_path` names (next to the output, or in ``$DOGFLOW_LOG_DIR``).
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

LOGGERS = ("prefect", "distributed")
TERMINAL_LEVEL = "DOGFLOW_TERMINAL_LOG_LEVEL"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def capture(output_path: str, run_name: str | None) -> Iterator[Path]:
    """Copy this run's Prefect and Dask log lines (INFO and up) into the run log file; yields its path."""
    from tasks.output import Output

    out = Output(output_path)
    path = out.log_path(run_name or "run", os.environ.get("SLURM_JOB_ID"),
                        folder=os.environ.get("DOGFLOW_LOG_DIR") or None)
    handler = _FileLog(path)
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield path
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        if not os.environ.get("DOGFLOW_LOG_DIR"):
            out.keep_log(path)  # an output on an object store gets a copy


class _FileLog(logging.Handler):
    """INFO and up into a file. Not a ``StreamHandler``: Dask's ``silence_logging`` (which LocalCluster and
    workers apply to every stream handler of the ``distributed`` logger) must not silence the run log."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self._file = logging.FileHandler(path)
        self._file.setFormatter(logging.Formatter(_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        self._file.emit(record)

    def close(self) -> None:
        self._file.close()
        super().close()


def quiet_terminal(verbose: bool) -> None:
    """Console output of Prefect and Dask: warnings and errors only, unless ``verbose``.

    In this process, Prefect's console handler and Dask's stream handlers are set to that level while the
    loggers stay at INFO, so the run log file and the Prefect API still get every line. Processes started
    from here get it through the environment: Prefect's console handler override, and
    ``$DOGFLOW_TERMINAL_LOG_LEVEL``, which the local cluster passes to Dask as ``silence_logs`` (its
    worker processes share this terminal).
    """
    import distributed  # noqa: F401  (sets up Dask's logging, whose handlers are adjusted below)

    level = "INFO" if verbose else "WARNING"
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = level
    os.environ[TERMINAL_LEVEL] = level
    for name in ("", "distributed"):  # Prefect's console handler sits on the root logger
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(level)
    logging.getLogger("distributed").setLevel(logging.INFO)
