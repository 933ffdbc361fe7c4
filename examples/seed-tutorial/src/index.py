# The seed tutorial's src/index.ts, line by line in Python.
from dockyard import Container, get_container


class NodeContainer(Container):
    default_port = 8080
    sleep_after = "10s"

    # Hooks are coroutines here (`async def`): Dockyard awaits them.
    async def on_start(self):
        print("Container successfully started")

    # on_stop gets the stop's details (Cloudflare's onStop gets {exitCode, reason} too);
    # the Python method names them even where, as here, it does not use them.
    async def on_stop(self, params):
        print("Container successfully shut down")

    async def on_error(self, error):
        print("Container error:", error)


async def fetch(request, env, ctx):
    # getContainer returns the stub at once (the tutorial's `await` on it does nothing in
    # JavaScript); it is fetch that is awaited.
    container = get_container(env.CONTAINER)
    return await container.fetch(request)
