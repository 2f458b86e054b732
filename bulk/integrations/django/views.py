"""`process_query` (POST JSON -> the engine's result) and `stats` (GET). Async views: under ASGI they
run on the server's loop; under WSGI Django runs them through its async-to-sync adapter."""

from __future__ import annotations

import json
import logging

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from bulk.errors import BulError, InvalidRequestError, engine_error_body, invalid_request_body
from bulk.integrations.django import get_engine

log = logging.getLogger(__name__)


@csrf_exempt  # a JSON API called by programs, not a form in a browser session
@require_POST
async def process_query(request: HttpRequest) -> JsonResponse:
    """Body: a request dict (`{"query": ..., "priority": ...}`); answer: the engine's result dict."""
    try:
        query = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return _invalid("body", 'must be a JSON object such as {"query": "..."}')
    if not isinstance(query, dict):
        return _invalid("body", f"must be a JSON object, got {type(query).__name__}")
    try:
        result = await get_engine().process_request(query)
    except InvalidRequestError as exc:
        return JsonResponse(invalid_request_body(exc), status=422)
    except BulError as exc:
        # The engine is shut down or its model failed to load: unavailable, not the client's fault.
        log.error("engine error: %s", exc)
        return JsonResponse(engine_error_body(exc), status=503)
    return JsonResponse(result)


@require_GET
async def stats(request: HttpRequest) -> JsonResponse:
    return JsonResponse(get_engine().get_stats())


def _invalid(field: str, message: str) -> JsonResponse:
    return JsonResponse(invalid_request_body(InvalidRequestError(field, message)), status=422)
