"""A fake OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, scripted answers, counted requests.

It reads the items from the last line of the last user message, answers from a per-test script (default: a
correct answer for every item, in reverse order) and records every request body.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator


@dataclass
class Reply:
    """What the fake server sends back: a status, headers, a JSON body, after an optional stall."""

    status: int = 200
    body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    stall: float = 0.0


def entry(item: dict, foreground: list[str] | None = None) -> dict:
    return {"id": item["id"], "foreground": foreground or [f"thing {item['id']}"], "background": ["snow"],
            "alt": ["desert"]}


def chat(content: str) -> Reply:
    """A chat completion carrying ``content``, with fixed token counts (10 + 5)."""
    return Reply(body={"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "fake-model",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})


def correct(items: list[dict], body: dict) -> Reply:
    return chat(json.dumps({"results": [entry(i) for i in reversed(items)]}))


def error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": "error", "code": None}}, headers=headers)


Behaviour = Callable[[list[dict], dict], Reply]


class FakeOpenAI:
    """The script and the record of one fake server."""

    def __init__(self) -> None:
        self.script: list[Behaviour] = []  # consumed one per request; then ``default``
        self.default: Behaviour = correct
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self.release = threading.Event()  # ends stalls at teardown
        self.lock = threading.Lock()
        self.url = ""

    @property
    def count(self) -> int:
        return len(self.bodies)

    def asked(self, n: int) -> list[str]:
        """The item ids of the n-th request."""
        return [i["id"] for i in items_of(self.bodies[n])]

    def handle(self, headers, body: dict) -> Reply:
        with self.lock:
            self.bodies.append(body)
            self.auth.append(headers.get("Authorization", ""))
            behaviour = self.script.pop(0) if self.script else self.default
        return behaviour(items_of(body), body)


def items_of(body: dict) -> list[dict]:
    last_user = [m for m in body["messages"] if m["role"] == "user"][-1]
    return json.loads(last_user["content"].splitlines()[-1])


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = fake.handle(self.headers, body) if self.path == "/v1/chat/completions" else error(404, "no")
        if reply.stall:
            fake.release.wait(reply.stall)
        data = json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def running_fake_openai() -> Iterator[FakeOpenAI]:
    """Serve a :class:`FakeOpenAI` on a free port for the duration of the block (``fake.url`` ends in /v1)."""
    fake = FakeOpenAI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield fake
    finally:
        fake.release.set()
        httpd.shutdown()
        httpd.server_close()
