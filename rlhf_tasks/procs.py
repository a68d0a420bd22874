"""Process-lifetime helpers shared by the job supervisor (launch.py) and the temporary Prefect API (flows/)."""
from __future__ import annotations

import sys


def set_pdeathsig(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent thread ends (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover
        pass
