"""Include with `path("", include("bulk.integrations.django.urls"))` for `/api/query` and `/api/stats`."""

from django.urls import path

from bulk.integrations.django import views

urlpatterns = [
    path("api/query", views.process_query, name="bul-process-query"),
    path("api/stats", views.stats, name="bul-stats"),
]
