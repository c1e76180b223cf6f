"""Engines of a cluster with ``tls:``: the links between them and the channel bridges speak wss.

The engines trust the test CA through ``SSL_CERT_FILE`` (the system store
that OpenSSL reads, as a deployment would configure it); workers reach the
engines in memory, so every socket here between engines is TLS.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.cluster.helpers import cluster_of, open_cluster, wait_for
from tests.modules.rest_api.helpers import (
    add_route,
    open_channel_side,
    open_worker,
    read_channel,
    rest_module,
)

pytestmark = pytest.mark.services  # the engines meet through Redis


def tls_config(tmp_path: Path) -> tuple[dict[str, str], str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return {"cert": str(cert_path), "key": str(key_path)}, str(ca_path)


async def test_calls_and_streamed_bodies_cross_engines_over_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, ca_file = tls_config(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    async with open_cluster(2, modules=[rest_module()], tls=tls) as (a, b):
        for engine in (a, b):
            (peer,) = cluster_of(engine).peers.values()
            assert peer.advertise.startswith("wss://") and peer.link.connected

        async def upload(data: Any) -> Any:
            async with open_channel_side(b, data["request_body"], "read") as side:
                blob = b"".join(
                    f if isinstance(f, bytes) else f.encode() for f in await read_channel(side)
                )
            return {"body": {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}

        async with open_worker(b, {"t::up": upload}) as worker:
            await add_route(b, worker, "t::up", "/up", "PUT")
            await wait_for(lambda: len(a.modules["rest_api"].routes) == 1)
            blob = bytes(range(256)) * 1024
            async with httpx.AsyncClient(  # the REST port speaks https too
                base_url=f"https://127.0.0.1:{a.modules['rest_api'].port}",
                verify=ssl.create_default_context(cafile=ca_file),
            ) as client:
                response = await client.put(
                    "/up", content=blob, headers={"content-type": "application/octet-stream"}
                )
            assert response.status_code == 200, response.text
            assert response.json() == {
                "size": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
