"""``tokenrelay-orchestrator``: run the gRPC orchestrator with the settings of TOKENRELAY_CONFIG."""

from __future__ import annotations

import sys

from tokenrelay import _loop
from tokenrelay.config import check_exposure, load_settings
from tokenrelay.logs import configure_logging
from tokenrelay.orchestrator.server import serve
from tokenrelay.tracing import configure_tracing, shutdown_tracing


def main() -> None:
    try:
        settings = load_settings()
        check_exposure(settings, "orchestrator")
    except (OSError, ValueError) as exc:
        sys.exit(f"tokenrelay-orchestrator: bad configuration: {exc}")
    configure_logging("orchestrator", settings.log_level)
    configure_tracing("orchestrator", settings.tracing)
    try:
        _loop.run(serve(settings), settings.event_loop)
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
