from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        query = "SELECT quote, author FROM qtable ORDER BY id LIMIT 1;"
        results = await self.env.DB.prepare(query).all()
        data = results.results[0]
        return Response.json({"quote": data.quote, "author": data.author})
