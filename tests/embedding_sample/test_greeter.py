"""The two ways to test a worker with the iii pytest plugin: a trio test with
``iii_engine``, a plain test with ``iii_engine_thread``."""

import subprocess
from functools import partial

import trio


async def test_hello_in_trio(iii_engine, greeter_argv):
    async with trio.open_nursery() as nursery:
        # The worker connects to this test's engine (a free port, bound for it).
        await nursery.start(partial(trio.run_process, [*greeter_argv, iii_engine.url], check=False))
        with trio.fail_after(30):
            await iii_engine.wait_for_function("greeter::hello")
        assert await iii_engine.call("greeter::hello", {"name": "trio"}) == {
            "message": "hello trio"
        }
        nursery.cancel_scope.cancel()  # stops the worker


def test_hello_in_a_plain_test(iii_engine_thread, greeter_argv):
    with subprocess.Popen([*greeter_argv, iii_engine_thread.url]) as worker:
        try:
            iii_engine_thread.wait_for_function("greeter::hello", timeout=30)
            answer = iii_engine_thread.call("greeter::hello", {"name": "sync"})
            assert answer == {"message": "hello sync"}
        finally:
            worker.kill()
