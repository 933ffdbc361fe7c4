import dockyard.objects


def test_exported_members_are_sorted_and_present() -> None:
    exported = dockyard.objects.__all__
    assert exported == sorted(exported)
    for name in exported:
        assert hasattr(dockyard.objects, name), name
    assert {"DurableObject", "DurableObjectNamespace", "ObjectHost"} <= set(exported)
