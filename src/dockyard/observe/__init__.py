"""Observability: logs, metrics and usage metering (issue 13)."""
