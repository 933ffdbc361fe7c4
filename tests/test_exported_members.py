"""The public surface users import from: `from dockyard import ...`."""

import dockyard


def test_all_is_sorted_and_complete() -> None:
    assert dockyard.__all__ == sorted(dockyard.__all__)
    assert {
        "Container",
        "DurableObject",
        "Request",
        "Response",
        "WorkerEntrypoint",
        "get_container",
        "get_random",
        "switch_port",
    } <= set(dockyard.__all__)
    for name in dockyard.__all__:
        assert getattr(dockyard, name) is not None, name


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name in vars(dockyard)
        if not name.startswith("_")
        and not isinstance(getattr(dockyard, name), type(dockyard))  # submodules
    }
    assert public == set(dockyard.__all__)
