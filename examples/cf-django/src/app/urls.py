from django.http import HttpResponse, JsonResponse
from django.urls import path


def home(request):
    return HttpResponse(f"Hello from Django on {request.environ['env'].SITE}")


def item(request, item_id):
    return JsonResponse({"item_id": item_id, "method": request.method})


urlpatterns = [path("", home), path("items/<int:item_id>", item)]
