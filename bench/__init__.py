"""Dockyard's benchmark harness: Dockyard against its baselines, on one machine, in one run.

``python -m bench [--quick]``; see bench/README.md.
"""
