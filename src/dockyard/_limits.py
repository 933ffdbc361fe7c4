"""Process limits a node raises at start (call ``raise_open_file_limit()`` once)."""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["raise_open_file_limit"]

log = logging.getLogger("dockyard.limits")


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; return (soft, hard) after.

    Every client connection, container connection and object database holds a file
    descriptor; the usual soft limit (1,024) is reached long before memory or CPU run
    out, while the hard limit (often 524,288 or more) is what an administrator allows.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # An unlimited hard limit cannot be the soft one; the kernel's cap can.
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("open-file limit raised from %d to %d", soft, target)
    return resource.getrlimit(resource.RLIMIT_NOFILE)
