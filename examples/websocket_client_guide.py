# Changed from the guide: the URI's host and port come from BUL_WS_URL (default the guide's
# ws://localhost:8002) so the tests can use a server on a free port; the "Uso" line runs under
# `if __name__ == "__main__"`. The server side is the package's `/ws/query` (bulk/server/websocket.py).
# ruff: noqa
# fmt: off
import asyncio
import os

import websockets
import json

async def query_websocket(query: str):
    """Cliente WebSocket."""
    uri = os.environ.get("BUL_WS_URL", "ws://localhost:8002") + "/ws/query"
    async with websockets.connect(uri) as websocket:
        # Enviar query
        await websocket.send(json.dumps({"query": query}))

        # Recibir resultado
        result = await websocket.recv()
        return json.loads(result)

# Uso
if __name__ == "__main__":
    result = asyncio.run(query_websocket("Create marketing strategy"))
