"""URLconf of the Django tests: the packaged app's URLs, and the guide's sample view beside them."""

from apps.bul_integration import views as guide_views  # examples/django_guide, put on sys.path by conftest
from django.urls import include, path

urlpatterns = [
    path("", include("bulk.integrations.django.urls")),
    path("guide/process_query", guide_views.process_query),
]
