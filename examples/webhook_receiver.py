"""Example: an HTTP endpoint for Empath's webhook delivery that checks every signature.

    python examples/webhook_receiver.py --secret-file /etc/empath/webhook.secret \
        --out /var/spool/incoming-mail [--host 127.0.0.1] [--port 8080]

A request is accepted (200) only with a valid ``X-Empath-Signature`` over
``X-Empath-Timestamp + "." + body`` (HMAC-SHA256, docs/WEBHOOKS.md) and a timestamp within five
minutes of this machine's clock; anything else gets 401 and is not stored, so Empath retries it
(a 4xx other than 408 and 429 would bounce it: 401 is what a misconfigured secret should do,
loudly). Both formats are handled; each accepted message is written to
``<out>/<queue id>.eml`` (a retry overwrites the same file: idempotent). Prints
``listening on HOST:PORT`` once it serves (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import os
import time
from hashlib import sha256
from pathlib import Path

from aiohttp import MultipartReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

TOLERANCE = 300  # seconds between the sender's clock and ours


def verify(secret: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE:
        return False
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                    sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


async def _message_of(request: web.Request, body: bytes) -> tuple[str, bytes]:
    """(queue id, raw message) from a json or multipart body."""
    if request.content_type == "application/json":
        doc = json.loads(body)
        return str(doc["id"]), base64.b64decode(doc["message"])
    # multipart/form-data, parsed by aiohttp's reader from the body already read (it had to
    # be read whole to check the signature first).
    stream = StreamReader(BaseProtocol(asyncio.get_running_loop()), len(body) + 2 ** 16)
    stream.feed_data(body)
    stream.feed_eof()
    reader = MultipartReader({"Content-Type": request.headers["Content-Type"]}, stream)
    envelope: dict[str, object] = {}
    message = b""
    async for part in reader:
        if isinstance(part, MultipartReader):
            continue
        content = await part.read(decode=False)
        if part.name == "envelope":
            envelope = json.loads(content)
        elif part.name == "message":
            message = bytes(content)
    return str(envelope["id"]), message


def make_app(secret: bytes, out: Path) -> web.Application:
    async def incoming(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret, request.headers.get("X-Empath-Timestamp", ""), body,
                      request.headers.get("X-Empath-Signature", "")):
            return web.Response(status=401, text="bad or missing signature\n")
        queue_id, message = await _message_of(request, body)
        if not queue_id.isalnum():
            return web.Response(status=400, text="bad queue id\n")
        tmp = out / f".{queue_id}.tmp"
        tmp.write_bytes(message)
        os.replace(tmp, out / f"{queue_id}.eml")
        return web.Response(text="stored\n")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/incoming-mail", incoming)
    return app


async def serve(host: str, port: int, secret: bytes, out: Path) -> None:
    runner = web.AppRunner(make_app(secret, out))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    secret = Path(args.secret_file).read_text().splitlines()[0].strip().encode()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.host, args.port, secret, out))


if __name__ == "__main__":
    main()
