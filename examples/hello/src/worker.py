import logging

from dockyard import Container, get_container

log = logging.getLogger("hello")


class HelloContainer(Container):
    default_port = 8080
    sleep_after = "10s"

    async def on_start(self):
        log.info("Container successfully started")

    async def on_stop(self, params):
        log.info(
            "Container successfully shut down (exit code %s, %s)", params.exit_code, params.reason
        )

    async def on_error(self, error):
        log.error("Container error: %s", error)
        raise error


async def fetch(request, env, ctx):
    container = get_container(env.CONTAINER)
    return await container.fetch(request)
