from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response("the cron runs in the background")

    async def scheduled(self, controller, env, ctx):
        print(f"cron processed: {controller.cron} at {controller.scheduledTime:.0f}", flush=True)
