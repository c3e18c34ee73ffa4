from django.contrib import admin
from django.http import HttpResponse
from django.urls import path


def index(request):
    return HttpResponse("hello from django")


urlpatterns = [
    path("", index),
    path("admin/", admin.site.urls),
]
