"""Structured output: ask for JSON, validate it with a pydantic model, repair it once.

A model's answer is untrusted input like any vendor payload: it is parsed at the edge into a
typed model, and nothing downstream sees the raw text. An answer that does not validate gets
one repair attempt (the model is shown the validation error and asked again); an answer still
invalid after that is `AIJobError(retryable=False)`: asking the same again would most likely
fail the same way, and each attempt costs tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from glaze_pipeline.core.ai.errors import AIJobError
from glaze_pipeline.core.ai.prompts import Prompt

if TYPE_CHECKING:  # the client is passed in; these modules never talk HTTP themselves
    from glaze_pipeline.core.ai.client import Completion, LlmClient


T = TypeVar("T", bound=BaseModel)

# How much of the invalid answer and of the error the repair message repeats.
REPAIR_ERROR_CHARS = 1500
REPAIR_MESSAGE = (
    "Your answer could not be used: {error}\n"
    "Answer again with only the JSON object the instructions describe, and nothing else."
)


@dataclass(frozen=True)
class AnswerUsage:
    """What one answer took: the prompt version and model that gave it, and the tokens,
    credits and HTTP attempts of every call it took (a repair included)."""

    prompt_version: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    calls: int


@dataclass(frozen=True)
class Structured(Generic[T]):
    """A validated answer and what it took."""

    value: T
    usage: AnswerUsage
    repaired: bool


class InvalidAnswer(ValueError):
    """A model answer that is not the JSON object asked for."""


async def ask(
    client: LlmClient, prompt: Prompt, variables: Mapping[str, Any], output: type[T]
) -> Structured[T]:
    """Render `prompt`, ask for JSON, validate it as `output`; one repair, then AIJobError."""
    messages = prompt.render(**variables)
    completions: list[Completion] = []

    async def call(chat: list[dict[str, str]]) -> Completion:
        completion = await client.complete(
            chat, operation=prompt.name, prompt_version=prompt.version, json_output=True
        )
        completions.append(completion)
        return completion

    first = await call(messages)
    try:
        value = parse_answer(first.text, output)
        repaired = False
    except InvalidAnswer as error:
        repair = [
            *messages,
            {"role": "assistant", "content": first.text[:REPAIR_ERROR_CHARS]},
            {"role": "user", "content": REPAIR_MESSAGE.format(error=error)},
        ]
        second = await call(repair)
        try:
            value = parse_answer(second.text, output)
        except InvalidAnswer as again:
            raise AIJobError(
                f"LLM {prompt.name}: the answer is still invalid after one repair: {again}",
                retryable=False,
            ) from None
        repaired = True
    usage = AnswerUsage(
        prompt_version=prompt.version,
        model=completions[-1].model,
        prompt_tokens=sum(c.prompt_tokens for c in completions),
        completion_tokens=sum(c.completion_tokens for c in completions),
        cost=round(sum(c.cost for c in completions), 6),
        calls=sum(c.attempts for c in completions),
    )
    return Structured(value=value, usage=usage, repaired=repaired)


def parse_answer(text: str, output: type[T]) -> T:
    """`text` as an `output`: one JSON object (a Markdown code fence around it is tolerated)."""
    body = _unfenced(text)
    try:
        data = json.loads(body)
    except ValueError as error:
        raise InvalidAnswer(f"it is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise InvalidAnswer(f"it is JSON but not an object (a {type(data).__name__})")
    try:
        return output.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'answer'}: {problem['msg']}"
            for problem in error.errors()[:10]
        )
        raise InvalidAnswer(
            f"it does not match the expected shape ({problems[:REPAIR_ERROR_CHARS]})"
        ) from None


def _unfenced(text: str) -> str:
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    return body.strip()
