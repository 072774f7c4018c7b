"""``tokenrelay-edge``: run the HTTP edge with the settings of TOKENRELAY_CONFIG."""

from __future__ import annotations

import os
import sys

from tokenrelay._affinity import parse_cpus, place
from tokenrelay._workers import WorkerContext
from tokenrelay.config import check_exposure, load_settings
from tokenrelay.edge.app import run, supervise
from tokenrelay.logs import configure_logging
from tokenrelay.tracing import configure_tracing, shutdown_tracing


def main() -> None:
    worker = WorkerContext.from_argv(sys.argv[1:])  # given by a supervisor (edge.workers > 1)
    try:
        settings = load_settings()
        check_exposure(settings, "edge")
    except (OSError, ValueError) as exc:
        sys.exit(f"tokenrelay-edge: bad configuration: {exc}")
    configure_logging("edge", settings.log_level)
    try:
        place(parse_cpus(settings.edge.cpus))
    except ValueError as exc:
        sys.exit(f"tokenrelay-edge: bad configuration: {exc}")
    if worker is None and settings.edge.workers > 1:
        try:
            sys.exit(supervise(settings.edge, os.environ, settings.event_loop))
        except OSError as exc:
            ports = ", ".join(filter(None, (settings.edge.listen, settings.edge.health_listen)))
            sys.exit(f"tokenrelay-edge: cannot listen on {ports}: {exc}")
    configure_tracing("edge", settings.tracing)
    try:
        run(settings.edge, settings.secrets, settings.event_loop, settings.tenancy, worker)
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
