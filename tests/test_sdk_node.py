"""The official Node SDK (npm ``iii-sdk``) against the engine, beside a Python worker."""

from __future__ import annotations

import json

import pytest
import trio

from iii.testing import open_test_engine
from tests.sdk_workers import SCRIPTS, command
from tests.support import start_node_worker, start_sdk_worker

pytestmark = pytest.mark.sdk

NODE_WORKER = r"""
import { registerWorker, TriggerAction } from 'iii-sdk'
import readline from 'node:readline'

const iii = registerWorker(process.argv[2], { workerName: 'node-worker' })
iii.registerFunction('node::echo', async (input) => {
  console.log('CALLED node::echo ' + JSON.stringify(input))
  return { echo: input, by: 'node' }
})
console.log('READY')
const lines = readline.createInterface({ input: process.stdin })
for await (const line of lines) {
  const cmd = JSON.parse(line)
  try {
    let out = null
    if (cmd.op === 'call') out = await iii.trigger({ function_id: cmd.fn, payload: cmd.data })
    if (cmd.op === 'void') iii.trigger({ function_id: cmd.fn, payload: cmd.data, action: TriggerAction.Void() })
    console.log('OK ' + JSON.stringify(out))
  } catch (e) {
    console.log('ERR ' + JSON.stringify({ code: e.code ?? null, message: String(e.message ?? e) }))
  }
}
process.exit(0)
"""


async def test_node_and_python_workers_call_each_other():
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with (
            start_node_worker(NODE_WORKER, url=url) as node,
            start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=url) as python,
        ):
            await node.wait_for("READY", timeout=60)
            await python.wait_for("READY")
            await command(python, op="register", id="py::echo")
            with trio.fail_after(20):
                while not {"node::echo", "py::echo"} <= set(engine.registry.functions):
                    await trio.sleep(0.05)

            status, value = await command(
                python, op="call", fn="node::echo", data={"from": "python"}
            )
            assert status == "OK" and value["by"] == "node" and value["echo"]["from"] == "python"
            status, value = await command(node, op="call", fn="py::echo", data={"from": "node"})
            assert status == "OK" and value["by"] == "0.25.0" and value["echo"]["from"] == "node"
            status, error = await command(node, op="call", fn="nope::missing", data={})
            assert status == "ERR" and error["code"] == "function_not_found"
            await command(python, op="void", fn="node::echo", data={"void": True})
            line = await node.wait_for("CALLED node::echo", contains='"void":true')
            assert json.loads(line.split(" ", 2)[2])["void"] is True
