"""``extract`` backend ``openai``: any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, llama.cpp, ...).

ASPIRE Sec. 2(3) and Appendix A.6 (https://arxiv.org/abs/2308.10103): one generic prompt with annotated
exemplars; the LLM returns, per (caption, label), the foreground phrases (ignoring the label), the predominant
background and an alternative background.

Retries. One ``openai.OpenAI`` client does them, with ``max_retries=config.max_retries``; this module does not
re-implement them. Checked in the installed SDK (``openai/_base_client.py``, ``SyncAPIClient.request`` and
``_should_retry``): it retries timeouts and connection errors, and the HTTP statuses 408, 409, 429 and >= 500
(a server's ``x-should-retry: true/false`` header overrides that). It waits ``retry-after-ms`` or
``retry-after`` when the server sends one between 0 (exclusive) and 120 s, otherwise 0.5 s * 2**n capped at
8 s, minus up to 25 % jitter. Errors left after the retries (``openai.APIError`` and subclasses) never leave
:meth:`OpenAIExtractor.extract`: the items of that request get a ``request failed: ...`` reason.

The API key is read from the environment variable named by ``extract.api_key_env``; it never enters the
identity, a log line, a failure reason or the cache. A local server that needs no key still needs the variable
set, to anything (``export OPENAI_API_KEY=none``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import openai
from pydantic import BaseModel, ValidationError

from aspire.config import ExtractConfig
from aspire.manifest import digest
from tasks.extract import BatchResult, Extraction, ExtractItem, prompt_file

log = logging.getLogger(__name__)

MESSAGES_VERSION = 1  # bump when the way messages are built changes: it is part of ``identity`` (the cache key)
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)


class _Exemplar(BaseModel):
    """One annotated line of the exemplars file."""

    caption: str
    label: str
    foreground: list[str]
    background: list[str]
    alt: list[str]


class _Entry(BaseModel):
    """One entry of the model's ``results`` list (lists or strings accepted for background and alt)."""

    id: str | int
    foreground: list[str]
    background: list[str] | str | None
    alt: list[str] | str | None


def _first(value: list[str] | str | None) -> str:
    """A single phrase from a list (its first element), a string, or nothing."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return (value or "").strip()


def load_exemplars(name: str) -> list[_Exemplar]:
    """The annotated exemplars (JSON lines); raises ``ValueError`` naming the file and line of a bad one."""
    path = prompt_file(name)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(_Exemplar.model_validate_json(line))
            except ValidationError as err:
                raise ValueError(f"extract.exemplars: {path}:{n} is not a valid exemplar: {err}") from None
    return out


def few_shot(prompt: str, exemplars: list[_Exemplar]) -> list[dict[str, str]]:
    """System prompt, then the exemplars as one user turn and the assistant's answer in the output format."""
    asked = [{"id": f"example-{i}", "caption": e.caption, "label": e.label} for i, e in enumerate(exemplars, 1)]
    answered = {"results": [{"id": f"example-{i}", "foreground": e.foreground, "background": e.background,
                             "alt": e.alt} for i, e in enumerate(exemplars, 1)]}
    messages = [{"role": "system", "content": prompt}]
    if exemplars:
        messages += [{"role": "user", "content": json.dumps(asked)},
                     {"role": "assistant", "content": json.dumps(answered)}]
    return messages


def parse_json(text: str) -> Any:
    """The JSON in a model's answer: as it is, inside ``` fences, or the outermost ``{...}`` amid prose.

    Raises:
        ValueError: when none of these is valid JSON (e.g. a truncated answer).
    """
    start, end = text.find("{"), text.rfind("}")
    candidates = [text, *_FENCE.findall(text)] + ([text[start : end + 1]] if 0 <= start < end else [])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no valid JSON in the answer ({len(text)} chars, starting {text[:60]!r})")


def read_answer(text: str, asked: list[ExtractItem]) -> tuple[dict[str, Extraction], dict[str, str]]:
    """Map a model's answer back to the asked items by id.

    Returns:
        (extractions by id, problem by id for every asked item without a valid entry). Entries whose id was
        not asked are ignored (logged); for a repeated id the first valid entry wins.
    """
    ids = {item.id for item in asked}
    try:
        value = parse_json(text)
        entries = value.get("results") if isinstance(value, dict) else value
        if not isinstance(entries, list):
            raise ValueError("the answer has no 'results' list")
    except ValueError as err:
        return {}, {i: f"invalid JSON: {err}" for i in ids}
    got, problems = {}, {}
    for raw in entries:
        raw_id = str(raw.get("id")) if isinstance(raw, dict) else None
        try:
            entry = _Entry.model_validate(raw)
        except ValidationError as err:
            if raw_id in ids:
                problems[raw_id] = f"invalid entry: {err.errors()[0]['loc']} {err.errors()[0]['msg']}"
            continue
        entry_id = str(entry.id)
        if entry_id not in ids:
            log.warning("ignoring an answer for id %r, which was not in the request", entry_id)
            continue
        got.setdefault(entry_id, Extraction(foreground=[p.strip() for p in entry.foreground if p.strip()],
                                            background=_first(entry.background), alt=_first(entry.alt)))
    return got, {i: problems.get(i, "missing from the answer") for i in ids if i not in got}


def openai_identity(config: ExtractConfig) -> str:
    """What the answers depend on: model, temperature, prompt and exemplars (never the key).

    The server URL is left out on purpose: moving a server to another port must not void the cache."""
    prompt = prompt_file(config.prompt).read_text(encoding="utf-8")
    exemplars_text = prompt_file(config.exemplars).read_text(encoding="utf-8")
    return (f"openai:model={config.model}:temperature={config.temperature}:"
            f"prompt={digest({'prompt': prompt, 'exemplars': exemplars_text, 'v': MESSAGES_VERSION})}")


class OpenAIExtractor:
    """Extraction by an OpenAI-compatible chat model, ``captions_per_request`` items per request.

    Args:
        config: the ``extract`` section (model, temperature, base_url, api_key_env, timeout, max_retries, ...).

    Raises:
        ValueError: when the environment variable ``config.api_key_env`` is unset or empty.
        FileNotFoundError: when the prompt or exemplars file does not exist.
    """

    def __init__(self, config: ExtractConfig) -> None:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ValueError(
                f"extract.api_key_env={config.api_key_env!r}: the environment variable {config.api_key_env} is not "
                "set; export it with your API key (any value, e.g. 'none', for a local server that needs no key)"
            )
        self.config = config
        self.base_url = config.base_url or os.environ.get("OPENAI_BASE_URL") or None  # None: the SDK's default
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, timeout=config.timeout,
                                    max_retries=config.max_retries)
        prompt = prompt_file(config.prompt).read_text(encoding="utf-8")
        self.messages = few_shot(prompt.strip(), load_exemplars(config.exemplars))
        self._json_mode = True  # response_format=json_object, until a server rejects it
        self.identity = openai_identity(config)

    def extract(self, items: list[ExtractItem]) -> BatchResult:
        """Extract every item, ``captions_per_request`` at a time; never raises for API or answer errors.

        Returns:
            extractions and failure reasons by item id; ``usage`` sums the server's token counts and counts the
            requests this extractor issued (repairs and the response_format fallback included; the SDK's own
            retries of one request are not).

        Raises:
            ValueError: when two items share an id (answers could not be mapped back).
        """
        # 1. Check inputs
        ids = [item.id for item in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"items: ids must be unique, repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
        # 2. One request (and its repairs) per chunk
        result = BatchResult(usage={**dict.fromkeys(USAGE_KEYS, 0), "requests": 0})
        size = self.config.captions_per_request
        for start in range(0, len(items), size):
            self._extract_chunk(items[start : start + size], result)
        log.info("extracted %d of %d items with %s in %d requests (%d failed)", len(result.extractions),
                 len(items), self.config.model, result.usage["requests"], len(result.failures))
        return result

    def _extract_chunk(self, chunk: list[ExtractItem], result: BatchResult) -> None:
        """Ask for a chunk, then re-ask only the items missing or malformed, up to ``max_repairs`` times."""
        pending, problems, note = chunk, {}, ""
        for attempt in range(self.config.max_repairs + 1):
            try:
                text = self._complete(self._messages(pending, note), result.usage)
            except openai.OpenAIError as err:  # what is left after the SDK's retries
                reason = self._redact(f"request failed: {type(err).__name__}: {err}")[:300]
                log.warning("%d items: %s", len(pending), reason)
                result.failures.update({item.id: reason for item in pending})
                return
            got, problems = read_answer(text, pending)
            result.extractions.update(got)
            pending = [item for item in pending if item.id in problems]
            if not pending:
                return
            note = "; ".join(sorted(set(problems.values())))[:300]
            if attempt < self.config.max_repairs:
                log.warning("re-asking %d items missing or malformed in the answer (%s)", len(pending), note)
        repairs = self.config.max_repairs
        log.warning("%d items still missing or malformed after %d repairs (%s)", len(pending), repairs, note)
        for item in pending:
            result.failures[item.id] = f"malformed answer after {repairs} repairs: {problems[item.id]}"[:300]

    def _messages(self, items: list[ExtractItem], note: str) -> list[dict[str, str]]:
        """The few-shot messages and the items (JSON on the last line; a repair note above it on re-asks)."""
        asked = json.dumps([item.model_dump() for item in items])
        if note:
            asked = (f"Your previous answer for these items could not be used ({note}). Answer again with only "
                     f"the JSON object, one entry per id:\n{asked}")
        return [*self.messages, {"role": "user", "content": asked}]

    def _complete(self, messages: list[dict[str, str]], usage: dict[str, int]) -> str:
        """One chat completion (SDK retries inside); falls back once to no response_format if it is refused."""
        while True:
            json_mode = self._json_mode
            extra = {"response_format": {"type": "json_object"}} if json_mode else {}
            usage["requests"] += 1
            try:
                response = self.client.chat.completions.create(
                    model=self.config.model, temperature=self.config.temperature, messages=messages, **extra
                )
                break
            except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
                if not (json_mode and "response_format" in str(err).lower()):
                    raise
                log.warning("the server refused response_format=json_object; asking without it from now on")
                self._json_mode = False
        counts = getattr(response, "usage", None)
        for key in USAGE_KEYS:
            usage[key] += int(getattr(counts, key, 0) or 0)
        choices = getattr(response, "choices", None) or []
        return (choices[0].message.content or "") if choices else ""

    def _redact(self, text: str) -> str:
        """The text with the API key masked (a server may echo it in an error message)."""
        key = self.client.api_key
        return text.replace(key, "***") if isinstance(key, str) and key else text
