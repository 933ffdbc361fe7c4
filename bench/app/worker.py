"""The benchmark's worker: routes by the first path segment.

/web/NAME/...       -> container object NAME of class Web (the request is forwarded as is)
/sleepy/NAME/...    -> container object NAME of class Sleepy (pauses when it sleeps)
/boot/NAME/...      -> container object NAME of class Boot (works ~1 s at boot, lite, boosted)
/bootquota/NAME/... -> the same, class BootQuota: lite with its CPU quota from the start
/plain/NAME         -> plain Durable Object NAME (answers "ok", stores nothing)
/destroy/KIND/NAME  -> kill that object's container now (it is cold again afterwards)
/state/KIND/NAME    -> the object's container state
/live               -> live Durable Object instances per class, when the host tells
"""

import json

from dockyard import Container, DurableObject, Response, get_container


class Web(Container):
    default_port = 8080
    sleep_after = "30m"


class Sleepy(Container):
    default_port = 8080
    sleep_after = "1s"
    # Opt-in where Dockyard supports it; an older Container ignores the attribute.
    sleep_mode = "pause"


class Boot(Container):
    default_port = 8080
    sleep_after = "30m"
    entrypoint = ["python3", "-u", "/srv/boot.py"]
    # Without the boost, 1 s of CPU at 1/16 vCPU takes about 16 s: give it time.
    port_timeout = 90.0


class BootQuota(Boot):
    # Opts out of the start boost (an older Container ignores the attribute).
    start_boost = False


class Plain(DurableObject):
    async def fetch(self, request):
        return Response("ok\n")


CONTAINERS = {"web": "WEB", "sleepy": "SLEEPY", "boot": "BOOT", "bootquota": "BOOT_QUOTA"}


async def fetch(request, env, ctx):
    parts = request.path.split("/", 4)
    kind = parts[1] if len(parts) > 1 else ""
    if kind in CONTAINERS and len(parts) > 2:
        return await get_container(getattr(env, CONTAINERS[kind]), parts[2]).fetch(request)
    if kind == "plain" and len(parts) > 2:
        return await env.PLAIN.get_by_name(parts[2]).fetch(request)
    if kind in ("destroy", "state") and len(parts) > 3 and parts[2] in CONTAINERS:
        stub = get_container(getattr(env, CONTAINERS[parts[2]]), parts[3])
        if kind == "destroy":
            await stub.destroy()
            return Response("destroyed\n")
        state = await stub.get_state()
        return Response(json.dumps({"status": state.status, "exit_code": state.exit_code}))
    if kind == "live":
        return Response(json.dumps(_live(env)))
    return Response("not found\n", status=404)


def _live(env):
    # The host's statistics are not part of the worker API; a benchmark may peek.
    host = getattr(env.PLAIN, "_delivery", None)
    statistics = getattr(host, "statistics", None)
    return statistics().live if statistics is not None else None
