"""An OpenAI-compatible proxy for prefill/decode disaggregation on one node, through lmkv.

    python launch/pd_proxy.py --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000

Each completion or chat completion goes first to a prefill instance (vLLM with
``"kv_role":"kv_producer"``) with ``max_tokens=1``: it computes the prompt and stores its
chunks in the node's lmkv-sidecar. Then the request goes unchanged to a decode instance
(``"kv_role":"kv_consumer"``), which loads those chunks from the sidecar's shared memory (or
waits for the ones still being written) instead of computing them, and its answer, streamed
or not, goes back to the client. No NIXL, no RDMA, no copy through the network: the
instances share the node's memory. ``launch/serve-pd.sh`` starts all three.

A prefill instance that fails (refused, an error status, past ``--prefill-timeout``) costs
only time: the request goes to the decode instance alone, which computes the prompt itself.
Several ``--prefill`` / ``--decode`` URLs are used in turn. Other paths (``/v1/models``, ...)
go to a decode instance.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import sys
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("lmkv.pd_proxy")

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill instance gets it: one token, no stream."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str], prefill_timeout: float) -> None:
        self._prefill = itertools.cycle([u.rstrip("/") for u in prefill])
        self._decode = itertools.cycle([u.rstrip("/") for u in decode])
        self._prefill_timeout = aiohttp.ClientTimeout(total=prefill_timeout)
        self._session: aiohttp.ClientSession | None = None
        self.prefill_failures = 0

    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def completion(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as e:
            return web.json_response({"error": {"message": f"bad request body: {e}", "type": "invalid_request"}},
                                     status=400)
        await self._prefill_first(request.path, body, request.headers)
        return await self._forward(request, next(self._decode), raw)

    async def _prefill_first(self, path: str, body: dict[str, Any], headers: Any) -> None:
        assert self._session is not None
        url = next(self._prefill) + path
        try:
            async with self._session.post(url, json=prefill_body(body), headers=_auth(headers),
                                          timeout=self._prefill_timeout) as resp:
                await resp.read()
                if resp.status == 200:
                    return
                problem = f"status {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            problem = f"{type(e).__name__}: {e}"
        self.prefill_failures += 1
        log.warning("prefill at %s failed (%s): the decode instance computes the prompt", url, problem)

    async def other(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, next(self._decode), await request.read())

    async def _forward(self, request: web.Request, base: str, raw: bytes) -> web.StreamResponse:
        """``request`` to ``base``; the answer streamed back as it comes."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            upstream = await self._session.request(request.method, base + request.path_qs, data=raw or None,
                                                   headers=headers)
        except aiohttp.ClientError as e:
            return web.json_response({"error": {"message": f"decode instance {base} unreachable: {e}",
                                                "type": "upstream_error"}}, status=502)
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS})
            await resp.prepare(request)
            async for piece in upstream.content.iter_any():
                await resp.write(piece)
            await resp.write_eof()
            return resp


def _auth(headers: Any) -> dict[str, str]:
    return {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}


def make_app(prefill: list[str], decode: list[str], prefill_timeout: float = 60.0) -> web.Application:
    proxy = Proxy(prefill, decode, prefill_timeout)
    app = web.Application(client_max_size=64 << 20)
    app["proxy"] = proxy
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    for path in COMPLETION_PATHS:
        app.router.add_post(path, proxy.completion)
    app.router.add_get("/health", lambda request: web.json_response({"ok": True}))
    app.router.add_route("*", "/{tail:.*}", proxy.other)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", action="append", required=True, metavar="URL",
                    help="a prefill instance (kv_producer); repeat for several")
    ap.add_argument("--decode", action="append", required=True, metavar="URL",
                    help="a decode instance (kv_consumer); repeat for several")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill-timeout", type=float, default=60.0, metavar="SECONDS",
                    help="after this long a prefill is given up and the decode instance computes the prompt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    web.run_app(make_app(args.prefill, args.decode, args.prefill_timeout), host=args.host, port=args.port,
                print=lambda *a: log.info("listening on http://%s:%d", args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
