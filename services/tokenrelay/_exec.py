"""Children started through a small exec wrapper instead of a ``preexec_fn``.

What a child must do before its command runs (arm the parent-death signal, drop root) is done
by a short Python program that then execs the command (``wrapped``), not by a ``preexec_fn``:
with a ``preexec_fn``, ``subprocess`` must fork() instead of vfork(), and a fork()ed child of a
process with live gRPC channels (a test run, a launcher that asked Triton over gRPC) runs gRPC's
fork handlers, whose restarted poller can abort the child before its exec (``epoll_wait error:
Bad file descriptor``, grpc/grpc#43055, grpcio 1.81 and later; it took down the test suite's
shared stack once). The wrapper starts with ``-I`` (no site: ~30 ms), and gives the command back
SIGPIPE and SIGXFSZ, which Python ignores at start and exec would keep ignored.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["wrapped"]

# Everything it needs is found before it drops root (the uid may not read Python's library).
_WRAPPER = """
import ctypes, os, shutil, signal, sys
sig, launcher, uid = (int(a) for a in sys.argv[1:4])
command = sys.argv[4:]
path = shutil.which(command[0]) or command[0]
if sig:
    if ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    if os.getppid() != launcher:
        sys.exit(f"the launcher exited before {command[0]} started")
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
os.execv(path, command)
"""


def wrapped(
    command: list[str], *, death_signal: signal.Signals | None = None, user: int | None = None
) -> list[str]:
    """``command``, to be started so that it gets ``death_signal`` when the thread that starts
    it dies (``PR_SET_PDEATHSIG``, kept across exec; Linux only, elsewhere ignored) and runs as
    ``user`` (its uid and gid alike, no supplementary groups; root only). ``command`` itself
    when there is nothing to do."""
    sig = int(death_signal) if death_signal is not None and sys.platform == "linux" else 0
    if not sig and user is None:
        return command
    uid = -1 if user is None else user
    return [sys.executable, "-I", "-c", _WRAPPER, str(sig), str(os.getpid()), str(uid), *command]
