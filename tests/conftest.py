import pytest

pytest_plugins = ["tests.support.engine"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dockyard")
    group.addoption(
        "--serial",
        choices=("all", "without", "only"),
        default="all",
        help="tests marked serial: run them too (all), leave them out (without: the "
        "parallel phase of scripts/check) or run only them (only: its second phase)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    choice = config.getoption("--serial")
    if choice == "all":
        return
    keep_serial = choice == "only"
    kept, dropped = [], []
    for item in items:
        serial = item.get_closest_marker("serial") is not None
        (kept if serial == keep_serial else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
