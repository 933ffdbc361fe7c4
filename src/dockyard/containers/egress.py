"""The host firewall rule that makes `enable_internet=False` a real egress block.

A container on Dockyard's no-internet bridge network gets no NAT, so no answer from
outside can reach it; but its packets would still leave the host with their private
source address (measured: SYNs to the package index went out of eth0). The engine offers
no bridge network that both publishes ports and has no route out (an `internal` network
publishes no ports at all on Docker 20.10), so Dockyard adds one rule of its own to the
engine's DOCKER-USER chain, which the engine keeps across its restarts:

    iptables -I DOCKER-USER -i <bridge> -j REJECT --reject-with icmp-admin-prohibited

Everything the bridge would forward is refused at the host: the internet, other
networks, and the other containers on the same bridge. Published ports are unaffected
(the engine's proxy reaches the container from the host, which is not forwarding).
The host's own addresses are not covered: the container can still reach services that
listen on the bridge's gateway address.

Managing iptables needs root on the engine's host, so this applies only when Dockyard
runs as root beside a local engine; elsewhere `RuntimeCapabilities.egress_firewall` is
False and only the missing NAT holds the container in.
"""

from __future__ import annotations

import asyncio
import os
import shutil

__all__ = ["allow_forwarding", "block_forwarding", "can_manage_firewall"]

_CHAIN = "DOCKER-USER"
_VERDICT = ("-j", "REJECT", "--reject-with", "icmp-admin-prohibited")


def can_manage_firewall(engine_address: str) -> bool:
    """Whether this process can change the firewall of the engine's host."""
    local = engine_address.startswith("unix://")
    return local and os.geteuid() == 0 and shutil.which("iptables") is not None


async def block_forwarding(bridge: str) -> bool:
    """Refuse everything `bridge` would forward; True once the rule is in place."""
    rule = (_CHAIN, "-i", bridge, *_VERDICT)
    if await _iptables("-C", *rule) == 0:
        return True
    return await _iptables("-I", *rule) == 0


async def allow_forwarding(bridge: str) -> None:
    """Remove the rule `block_forwarding` added (every copy of it)."""
    rule = (_CHAIN, "-i", bridge, *_VERDICT)
    while await _iptables("-C", *rule) == 0:
        if await _iptables("-D", *rule) != 0:
            return


async def _iptables(*args: str) -> int:
    # -w: wait for the xtables lock that the engine also takes, rather than fail.
    proc = await asyncio.create_subprocess_exec(
        "iptables",
        "-w",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()
