"""WebSocket /ws/query with the `websockets` package as the client."""

from __future__ import annotations

import asyncio
import json

import websockets


def test_many_queries_streaming_and_a_malformed_message_on_one_socket(server):
    async def run():
        async with websockets.connect(f"{server.ws_url}/ws/query") as ws:
            # The guide's client: one query, one answer.
            await ws.send(json.dumps({"query": "Websocket-only query: a plan for a tea shop"}))
            first = json.loads(await ws.recv())
            # A malformed message: an error answer, and the socket stays open.
            await ws.send("{this is not json")
            broken = json.loads(await ws.recv())
            await ws.send(json.dumps({"query": "hi", "priority": "urgent"}))
            invalid = json.loads(await ws.recv())
            # The guide's server-side shape ({"text", "priority"}), streamed, with an id echoed.
            await ws.send(json.dumps({"text": "Stream a plan", "priority": 1, "stream": True, "id": 7}))
            streamed = []
            while True:
                message = json.loads(await ws.recv())
                streamed.append(message)
                if message.get("done"):
                    break
            await ws.send(json.dumps({"query": "Websocket-only query: a plan for a tea shop"}))
            again = json.loads(await ws.recv())
            return first, broken, invalid, streamed, again

    first, broken, invalid, streamed, again = asyncio.run(run())
    assert {"result", "cache_hit", "latency"} <= first.keys() and isinstance(first["result"], str)
    assert broken["error"]["field"] == "message" and "JSON" in broken["error"]["message"]
    assert invalid["error"]["field"] == "priority"
    tokens, final = streamed[:-1], streamed[-1]
    assert tokens and all("token" in m and m["id"] == 7 for m in tokens)
    assert final["id"] == 7 and final["result"] == "".join(m["token"] for m in tokens)
    assert again["cache_hit"] is True and again["result"] == first["result"]
