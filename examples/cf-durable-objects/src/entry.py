from urllib.parse import urlparse

from workers import DurableObject, Response, WorkerEntrypoint


class List(DurableObject):
    async def add(self, item):
        items = await self.ctx.storage.get("items") or []
        items.append(item)
        await self.ctx.storage.put("items", items)
        return items

    async def items(self):
        return await self.ctx.storage.get("items") or []


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        stub = self.env.LIST.getByName(urlparse(request.url).path.strip("/") or "default")
        if request.method == "POST":
            return Response.json(await stub.add(await request.text()))
        return Response.json(await stub.items())
