"""Egress rules as pure logic: Cloudflare's glob matching and the order in which
denied_hosts, allowed_hosts, handlers and enable_internet decide a request."""

from __future__ import annotations

import pytest

from dockyard.containers.outbound import EgressRules, call_handler, glob_match, proxy_env
from dockyard.http import Request, Response


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "api.example.com", False),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", True),
        ("api.*.internal", "api.eu.internal", True),
        ("api.*.internal", "api.internal", False),
        ("goo*gle", "google", True),
        ("goo*gle", "gooXXgle", True),
        ("a*a", "a", False),  # the prefix and the suffix may not share a character
        ("a*a", "aa", True),
        ("*", "anything.at.all", True),
        ("*x*y*", "axbyc", True),
        ("*x*y*", "aybxc", False),
        ("10.0.*", "10.0.3.4", True),
    ],
)
def test_glob_matches_like_cloudflare(pattern: str, value: str, expected: bool) -> None:
    assert glob_match(pattern, value) is expected


def test_no_rules_needs_no_proxy_and_forwards_everything() -> None:
    rules = EgressRules()
    assert not rules.needs_proxy
    assert rules.decide("example.com").action == "forward"
    # enable_internet=False alone is the network's job, not the proxy's.
    assert not EgressRules(enable_internet=False).needs_proxy


def test_denied_hosts_win_over_everything() -> None:
    rules = EgressRules(
        allowed_hosts=("*.example.com",),
        denied_hosts=("evil.example.com",),
        outbound="catch_all",
        outbound_by_host={"evil.example.com": "handler"},
    )
    assert rules.decide("evil.example.com").action == "block"
    assert rules.decide_tunnel("evil.example.com").action == "block"
    assert rules.decide("EVIL.example.com.").action == "block"  # case and trailing dot


def test_an_allowlist_denies_by_default_and_gates_handlers() -> None:
    rules = EgressRules(
        enable_internet=False,
        allowed_hosts=("allowed.test",),
        outbound_by_host={"api.internal": "answer"},
    )
    assert rules.needs_proxy
    assert rules.decide("allowed.test").action == "forward"
    assert rules.decide("other.test").action == "block"
    # A handler does not allow its host: the allowlist still gates it.
    assert rules.decide("api.internal").action == "block"
    # An empty allowlist (every entry removed) still denies everything.
    assert EgressRules(allowed_hosts=()).decide("allowed.test").action == "block"


def test_handlers_by_host_then_catch_all_then_internet() -> None:
    rules = EgressRules(
        enable_internet=False,
        outbound_by_host={"api.internal": "exact", "*.internal": "glob"},
        outbound="catch_all",
    )
    assert rules.decide("api.internal") == rules.decide("API.internal")
    assert rules.decide("api.internal").handler == "exact"
    assert rules.decide("kv.internal").handler == "glob"
    assert rules.decide("example.com").handler == "catch_all"
    # HTTPS tunnels never reach handlers; with no internet they are blocked.
    assert rules.decide_tunnel("api.internal").action == "block"
    only_hosts = EgressRules(enable_internet=True, outbound_by_host={"kv.internal": "kv"})
    assert only_hosts.decide("example.com").action == "forward"
    assert only_hosts.decide_tunnel("example.com").action == "forward"
    assert EgressRules(enable_internet=False, denied_hosts=("x",)).decide("y").action == "block"


def test_allowed_hosts_reach_the_internet_even_with_enable_internet_false() -> None:
    rules = EgressRules(enable_internet=False, allowed_hosts=("*.stripe.com",))
    assert rules.decide("api.stripe.com").action == "forward"
    assert rules.decide_tunnel("api.stripe.com").action == "forward"
    assert rules.decide_tunnel("api.paypal.com").action == "block"


def test_proxy_env_points_every_client_at_the_containers_own_loopback() -> None:
    env = proxy_env(15080)
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:15080"
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:15080"
    assert "127.0.0.1" in env["no_proxy"].split(",")


class Instance:
    """Stands for a Container instance: handlers are found and called on it."""

    tag = "instance"

    async def named(self, request: Request) -> Response:
        return Response(f"named {self.tag} {request.url}")

    def _private(self, request: Request) -> Response:
        return Response("never")


async def in_class_body(self: Instance, request: Request) -> Response:
    return Response(f"function {self.tag}")


async def test_handlers_are_names_functions_or_one_argument_callables() -> None:
    instance = Instance()
    request = Request("http://h.test/p")
    assert await (await call_handler(instance, "named", request)).text() == (
        "named instance http://h.test/p"
    )
    assert await (await call_handler(instance, in_class_body, request)).text() == (
        "function instance"
    )
    # Synchronous callables of the request alone work too.
    plain = await call_handler(instance, lambda r: Response("lambda"), request)
    assert await plain.text() == "lambda"
    with pytest.raises(TypeError, match="no public method '_private'"):
        await call_handler(instance, "_private", request)
    with pytest.raises(TypeError, match="returned str, not a Response"):
        await call_handler(instance, lambda r: "text", request)
