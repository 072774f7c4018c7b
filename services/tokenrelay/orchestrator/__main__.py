"""``tokenrelay-orchestrator``: run the gRPC orchestrator with the settings of TOKENRELAY_CONFIG."""

from __future__ import annotations

import os
import sys

from tokenrelay import _loop
from tokenrelay._affinity import parse_cpus, place
from tokenrelay._workers import WorkerContext
from tokenrelay.config import check_exposure, load_settings
from tokenrelay.logs import configure_logging
from tokenrelay.orchestrator.server import serve, supervise
from tokenrelay.tracing import configure_tracing, shutdown_tracing


def main() -> None:
    worker = WorkerContext.from_argv(sys.argv[1:])  # given by a supervisor (workers > 1)
    try:
        settings = load_settings()
        check_exposure(settings, "orchestrator")
    except (OSError, ValueError) as exc:
        sys.exit(f"tokenrelay-orchestrator: bad configuration: {exc}")
    configure_logging("orchestrator", settings.log_level)
    try:
        place(parse_cpus(settings.orchestrator.cpus))
    except ValueError as exc:
        sys.exit(f"tokenrelay-orchestrator: bad configuration: {exc}")
    if worker is None and settings.orchestrator.workers > 1:
        try:
            sys.exit(supervise(settings, os.environ))
        except OSError as exc:
            o = settings.orchestrator
            ports = ", ".join(
                filter(None, (o.listen, o.frames_listen, o.metrics_listen, o.health_listen))
            )
            sys.exit(f"tokenrelay-orchestrator: cannot listen on {ports}: {exc}")
    configure_tracing("orchestrator", settings.tracing)
    try:
        _loop.run(serve(settings, worker), settings.event_loop)
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
