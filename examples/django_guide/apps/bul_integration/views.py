# Changed from the guide: nothing.
# ruff: noqa
# fmt: off
# (lint and format are off: the code below is kept as the guide writes it)
# views.py
from django.http import JsonResponse
from django.views.decorators.http import require_http_methods
from django.views.decorators.csrf import csrf_exempt
import json

@csrf_exempt
@require_http_methods(["POST"])
async def process_query(request):
    """Procesar query con cache."""
    from apps.bul_integration.apps import BulIntegrationConfig
    
    engine = BulIntegrationConfig.cache_engine
    query_data = json.loads(request.body)
    
    result = await engine.process_request(query_data)
    return JsonResponse(result)
