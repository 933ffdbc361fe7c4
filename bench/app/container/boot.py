"""The boot scenario's server: real work at boot, then the same HTTP server as server.py.

Before it listens it imports a set of standard library modules and compiles the source
of standard library files (what an application's first import of an uncached package
does), a fixed amount of work: BOOT_ROUNDS rounds (default 12, about 1 s of CPU on a
2020s server core). The work is fixed, not timed, so a CPU quota makes the boot slower.
It prints how much CPU the work took.
"""

import importlib
import os
import sys
import time

MODULES = (
    "argparse",
    "asyncio",
    "csv",
    "dataclasses",
    "decimal",
    "email.parser",
    "http.client",
    "json",
    "logging.handlers",
    "pathlib",
    "sqlite3",
    "statistics",
    "typing",
    "urllib.request",
    "xml.etree.ElementTree",
    "zipfile",
)
SOURCES = ("argparse", "dataclasses", "pathlib", "typing", "zipfile", "statistics", "csv")


def boot(rounds: int) -> None:
    for name in MODULES:
        importlib.import_module(name)
    texts = []
    for name in SOURCES:
        path = sys.modules[name].__file__
        assert path is not None
        with open(path, encoding="utf-8") as source:
            texts.append((path, source.read()))
    for _ in range(rounds):
        for path, text in texts:
            compile(text, path, "exec", dont_inherit=True, optimize=0)


if __name__ == "__main__":
    started = time.process_time()
    boot(int(os.environ.get("BOOT_ROUNDS", "12")))
    print(f"boot work: {time.process_time() - started:.2f} s of CPU", flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import asyncio

    from server import main

    asyncio.run(main())
