"""HTTP requests forwarded to a worker on another engine, with streamed bodies (channels bridged)."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import orjson
import pytest
import trio

from iii.engine import Engine
from iii.testing import connect_test_worker
from tests.cluster.helpers import open_cluster, sees_function, wait_for
from tests.modules.rest_api.helpers import (
    add_route,
    open_channel_side,
    open_worker,
    read_channel,
    rest_module,
)

# Cluster membership lives in Redis.
pytestmark = pytest.mark.services


async def test_a_streamed_request_and_a_streamed_response_cross_engines() -> None:
    async with open_cluster(2, modules=[rest_module()]) as (a, b):

        async def upload(data: Any) -> Any:
            async with open_channel_side(b, data["request_body"], "read") as side:
                blob = b"".join(
                    f if isinstance(f, bytes) else f.encode() for f in await read_channel(side)
                )
            return {"body": {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}

        async def events(data: Any) -> Any:
            async with open_channel_side(b, data["response"], "write") as side:
                await side.send(orjson.dumps({"type": "set_status", "status_code": 201}).decode())
                await side.send(
                    orjson.dumps(
                        {"type": "set_headers", "headers": {"Content-Type": "text/event-stream"}}
                    ).decode()
                )
                await side.ws.send_message(b"data: one\n\n")
                await side.ws.send_message(b"data: two\n\n")
            return None

        async with open_worker(b, {"t::up": upload, "t::sse": events}) as worker:
            await add_route(b, worker, "t::up", "/up", "PUT")
            await add_route(b, worker, "t::sse", "/events", "GET")
            await wait_for(lambda: len(a.modules["rest_api"].routes) == 2)
            base = f"http://127.0.0.1:{a.modules['rest_api'].port}"
            blob = bytes(range(256)) * 1024 + b"tail"
            async with httpx.AsyncClient(base_url=base) as client:
                response = await client.put(
                    "/up", content=blob, headers={"content-type": "application/octet-stream"}
                )
                assert response.status_code == 200, response.text
                assert response.json() == {
                    "size": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest(),
                }
                streamed = await client.get("/events")
                assert streamed.status_code == 201
                assert streamed.headers["content-type"] == "text/event-stream"
                assert streamed.content == b"data: one\n\ndata: two\n\n"
            await wait_for(lambda: no_channels(a) and no_channels(b))


def no_channels(engine: Engine) -> bool:
    return len(engine.channels) == 0


# -- channels a worker made, at any depth, in data and in results ---------------------------


def frames_of(count: int) -> list[bytes | str]:
    """Binary chunks with a text message after each."""
    frames: list[bytes | str] = []
    for i in range(count):
        frames.append(hashlib.sha256(str(i).encode()).digest() * 512)
        frames.append(orjson.dumps({"i": i}).decode())
    return frames


async def write_frames(side: Any, frames: list[bytes | str]) -> None:
    for frame in frames:
        await side.ws.send_message(frame)


async def write_channel(engine: Engine, ref: dict[str, Any], frames: list[bytes | str]) -> None:
    """Open the write side of ``ref`` on ``engine``, write ``frames``, close it (the end)."""
    async with open_channel_side(engine, ref, "write") as side:
        await write_frames(side, frames)


def is_local_ref(engine: Engine, ref: dict[str, Any]) -> bool:
    return engine.channels.lookup(ref["channel_id"], ref["access_key"]) is not None


async def test_a_worker_made_channel_nested_in_the_data_streams_both_ways() -> None:
    frames = frames_of(40)  # 40 x 16 KiB: more than a socket buffer holds
    async with open_cluster(2) as (a, b):
        seen: list[dict[str, Any]] = []

        async def consume(data: Any) -> Any:
            ref = data["deep"][0]["input"]
            seen.append(ref)
            async with open_channel_side(b, ref, "read") as side:
                return {"frames": len(await read_channel(side)), "tag": data["deep"][0]["tag"]}

        async def produce(data: Any) -> Any:
            await write_channel(b, data["io"]["output"], frames)
            return {"wrote": len(frames)}

        async with (
            open_worker(b, {"t::consume": consume, "t::produce": produce}) as worker,
            connect_test_worker(a) as caller,
        ):
            for function_id in ("t::consume", "t::produce"):
                await worker.send({"type": "registerfunction", "id": function_id})
            await wait_for(
                lambda: sees_function(a, "t::consume") and sees_function(a, "t::produce")
            )
            made = await caller.call("engine::channels::create", {})
            pair = made["result"]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_channel, a, pair["writer"], frames)
                answer = await caller.call(
                    "t::consume", {"deep": [{"input": pair["reader"], "tag": "x"}]}, timeout=20
                )
            assert answer.get("error") is None, answer
            assert answer["result"] == {"frames": len(frames), "tag": "x"}
            assert seen[0]["channel_id"] != pair["reader"]["channel_id"]  # B's own, bridged
            made = await caller.call("engine::channels::create", {})
            pair = made["result"]
            async with open_channel_side(a, pair["reader"], "read") as reader:
                async with trio.open_nursery() as nursery:
                    got: list[list[bytes | str]] = []

                    async def read_all() -> None:
                        got.append(await read_channel(reader))

                    nursery.start_soon(read_all)
                    answer = await caller.call(
                        "t::produce", {"io": {"output": pair["writer"]}}, timeout=20
                    )
            assert answer.get("error") is None, answer
            assert got == [frames]
        await wait_for(lambda: no_channels(a) and no_channels(b))


async def test_channel_refs_in_a_result_are_opened_on_the_callers_engine() -> None:
    frames = frames_of(40)
    async with open_cluster(2) as (a, b):
        sunk: list[list[bytes | str]] = []
        async with (
            connect_test_worker(b) as maker,
            trio.open_nursery() as background,
        ):

            async def offer(data: Any) -> Any:
                pair = (await maker.call("engine::channels::create", {}))["result"]
                background.start_soon(write_channel, b, pair["writer"], frames)
                return {"stream": [{"reader": pair["reader"]}]}

            async def sink(data: Any) -> Any:
                pair = (await maker.call("engine::channels::create", {}))["result"]

                async def drain() -> None:
                    async with open_channel_side(b, pair["reader"], "read") as side:
                        sunk.append(await read_channel(side))

                background.start_soon(drain)
                return {"into": {"writer": pair["writer"]}}

            async with (
                open_worker(b, {"t::offer": offer, "t::sink": sink}) as worker,
                connect_test_worker(a) as caller,
            ):
                for function_id in ("t::offer", "t::sink"):
                    await worker.send({"type": "registerfunction", "id": function_id})
                await wait_for(lambda: sees_function(a, "t::offer") and sees_function(a, "t::sink"))
                answer = await caller.call("t::offer", {}, timeout=20)
                ref = answer["result"]["stream"][0]["reader"]
                assert is_local_ref(a, ref)  # a channel of A, bridged to B's
                async with open_channel_side(a, ref, "read") as side:
                    assert await read_channel(side) == frames
                answer = await caller.call("t::sink", {}, timeout=20)
                ref = answer["result"]["into"]["writer"]
                assert is_local_ref(a, ref)
                await write_channel(a, ref, frames)
                await wait_for(lambda: len(sunk) == 1)
                assert sunk == [frames]
        await wait_for(lambda: no_channels(a) and no_channels(b))


async def test_an_unopened_result_ref_goes_with_its_caller_and_refs_are_bounded() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as maker:

            async def offer(data: Any) -> Any:
                refs = []
                for _ in range(data["count"]):
                    refs.append((await maker.call("engine::channels::create", {}))["result"])
                return {"refs": refs}

            async def take(data: Any) -> Any:
                return {"got": len(data["refs"])}

            async with open_worker(b, {"t::offer": offer, "t::take": take}) as worker:
                for function_id in ("t::offer", "t::take"):
                    await worker.send({"type": "registerfunction", "id": function_id})
                await wait_for(lambda: sees_function(a, "t::offer") and sees_function(a, "t::take"))
                before = len(b.channels)
                async with connect_test_worker(a) as caller:
                    answer = await caller.call("t::offer", {"count": 1}, timeout=20)
                    assert answer.get("error") is None, answer
                    # both refs of the channel bridged, each to a channel owned by the caller
                    assert len(a.channels) == 2
                    answer = await caller.call("t::offer", {"count": 33}, timeout=20)
                    assert answer["error"]["code"] == "too_many_channels", answer
                    assert len(a.channels) == 2  # none left of the refused result
                    made = [
                        (await caller.call("engine::channels::create", {}))["result"]
                        for _ in range(33)
                    ]
                    channels_on_a = len(a.channels)
                    answer = await caller.call("t::take", {"refs": made}, timeout=20)
                    assert answer["error"]["code"] == "too_many_channels", answer
                    assert len(b.channels) == before + 1 + 33  # the maker's; nothing bridged
                    assert len(a.channels) == channels_on_a
                # the two bridged for the caller went with it; the 33 it made stay (owner-less)
                await wait_for(lambda: len(a.channels) == 33)


async def test_a_ref_passed_on_unopened_comes_back_as_the_callers_own() -> None:
    frames = frames_of(3)
    async with open_cluster(2) as (a, b):

        async def pass_on(data: Any) -> Any:
            return {"again": data["x"]["reader"]}

        async with (
            open_worker(b, {"t::pass": pass_on}) as worker,
            connect_test_worker(a) as caller,
        ):
            await worker.send({"type": "registerfunction", "id": "t::pass"})
            await wait_for(lambda: sees_function(a, "t::pass"))
            pair = (await caller.call("engine::channels::create", {}))["result"]
            answer = await caller.call("t::pass", {"x": {"reader": pair["reader"]}}, timeout=20)
            assert answer["result"] == {"again": pair["reader"]}, answer
            assert no_channels(b)  # B's stand-in, never opened, is gone
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_channel, a, pair["writer"], frames)
                async with open_channel_side(a, pair["reader"], "read") as side:
                    assert await read_channel(side) == frames
        await wait_for(lambda: no_channels(a))
