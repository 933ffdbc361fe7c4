from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        if request.js_object.path.startswith("/api/"):
            return Response.json({"path": request.js_object.path})
        return await self.env.ASSETS.fetch(request.js_object)
