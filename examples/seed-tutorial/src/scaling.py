# The tutorial's two other ways to reach containers (after "Because access to a container
# is via a Durable Object, you can also manually scale containers yourself"), as one
# worker: `dockyard dev examples/seed-tutorial -c scaling.wrangler.jsonc`.
#   /?three  3 unique container instances for every request, one per id
#   /        one of 5 instances picked at random (the tutorial's loadBalance)
# The Express app answers any query on "/", so both reach its one route.
from urllib.parse import urlparse

from index import NodeContainer  # the class the bindings name, as the tutorial defines it

from dockyard import Response, get_random

__all__ = ["NodeContainer", "fetch"]


async def fetch(request, env, ctx):
    if urlparse(request.url).query == "three":
        id_one = env.CONTAINER.id_from_name("one")
        id_two = env.CONTAINER.id_from_name("two")
        id_three = env.CONTAINER.id_from_name("three")
        answers = []
        for stub in (
            env.CONTAINER.get(id_one),
            env.CONTAINER.get(id_two),
            env.CONTAINER.get(id_three),
        ):
            response = await stub.fetch(request.url)
            if response.status != 200:
                return response  # e.g. 503 once max_instances containers run
            answers.append(await response.text())
        return Response("\n".join(answers))

    # loadBalance has since been renamed getRandom; Dockyard has both (load_balance is a
    # deprecated alias). Awaiting it is optional here, as on Cloudflare it is a Promise.
    container_instance = await get_random(env.CONTAINER, 5)
    return await container_instance.fetch(request)
