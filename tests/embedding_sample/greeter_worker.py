"""The user's worker: ``python greeter_worker.py ws://127.0.0.1:49134``.

It runs under the official iii SDK (0.25), in an interpreter of its own:
the SDK's package is also named ``iii``, so it cannot share the test's.
"""

import sys
import threading

from iii import InitOptions, register_worker


def hello(data):
    return {"message": f"hello {data['name']}"}


iii = register_worker(sys.argv[1], InitOptions(worker_name="greeter", otel={"enabled": False}))
iii.register_function("greeter::hello", hello)
threading.Event().wait()  # serve until killed
