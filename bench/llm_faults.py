"""LLM faults: the openai extractor against a faulty OpenAI-compatible server over real HTTP, per fault mode.

Usage: PYTHONPATH=tests .venv/bin/python -m bench.llm_faults

Per mode, 20 captions (5 per request) are extracted through ``tasks.extract.run_extract`` and its per-caption
cache while the server misbehaves, then again after it recovers. Reported: captions answered / failed, requests
sent during the fault (bounded by max_retries and max_repairs), the failure reason, wall time, requests the
rerun sends (only the failed captions should be asked again) and whether the API key appears in any result, reason
or cache file. Settings: timeout 1 s, max_retries 1, max_repairs 1.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from fake_openai import chat, correct, entry, error, running_fake_openai

from aspire.config import ExtractConfig
from tasks.extract import CaptionCache, run_extract
from tasks.extract_openai import OpenAIExtractor

SECRET = "sk-bench-SECRET-4711"
N, PER_REQUEST = 20, 5


def stalled(items, body):
    reply = correct(items, body)
    reply.stall = 5.0
    return reply


MODES = {
    "malformed JSON": lambda items, body: chat("{'results': [oops"),
    "answers under wrong ids": lambda items, body: chat(json.dumps({"results": [{**entry(i), "id": "x" + i["id"]} for i in items]})),
    "answers missing ids": lambda items, body: chat(json.dumps({"results": [entry(i) for i in items[:2]]})),
    "answer for a different count": lambda items, body: chat(json.dumps({"results": [entry(i) for i in items + items]})),
    "refusal": lambda items, body: chat("I'm sorry, but I can't help with that."),
    "401 unauthorized": lambda items, body: error(401, "invalid api key"),
    "429 with Retry-After": lambda items, body: error(429, "slow down", **{"retry-after": "0.2"}),
    "500": lambda items, body: error(500, "internal error"),
    "hanging server": stalled,
}


def rows() -> list[dict]:
    return [{"image_id": f"img-{i}", "caption": f"a red kettle number {i} on a wooden table", "class_name": "kettle"}
            for i in range(N)]


def main() -> None:
    os.environ["ASPIRE_BENCH_KEY"] = SECRET
    lines = ["| mode | answered / failed | requests during the fault | reason (first) | seconds | requests on the rerun "
             "after recovery | key in any output |", "|---|---|---|---|---|---|---|"]
    for mode, behaviour in MODES.items():
        with running_fake_openai() as fake, tempfile.TemporaryDirectory() as cache_dir:
            config = ExtractConfig(backend="openai", model="fake-model", base_url=fake.url, api_key_env="ASPIRE_BENCH_KEY",
                                   captions_per_request=PER_REQUEST, timeout=1.0, max_retries=1, max_repairs=1)
            fake.default = behaviour
            start = time.perf_counter()
            first = run_extract(rows(), config, OpenAIExtractor(config), CaptionCache(Path(cache_dir)))
            seconds = time.perf_counter() - start
            during = fake.count
            failed = [r for r in first.rows if r["extract_error"]]
            fake.default = correct
            second = run_extract(rows(), config, OpenAIExtractor(config), CaptionCache(Path(cache_dir)))
            rerun = fake.count - during
            still = sum(bool(r["extract_error"]) for r in second.rows)
            outputs = json.dumps([first.rows, second.rows]) + "".join(p.read_text() for p in Path(cache_dir).rglob("*.json"))
            reason = (failed[0]["extract_error"][:70] if failed else "-").replace("|", "/")
            lines.append(f"| {mode} | {N - len(failed)} / {len(failed)} | {during} | {reason} | {seconds:.1f} | {rerun}"
                         f"{' (still failed: %d)' % still if still else ''} | {'yes' if SECRET in outputs else 'no'} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
