"""Structured output on the real default model (SmolLM2-135M-Instruct) through the official openai
client's parse helpers: pydantic models with nested objects, enums, arrays with bounds and
required fields; the parsed answers validate, non-streamed and streamed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = {"role": "system", "content": "You answer in JSON."}


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: Annotated[str, Field(max_length=24)]
    country_code: Annotated[str, Field(pattern=r"^[A-Z]{2}$")]


class Person(BaseModel):
    name: Annotated[str, Field(max_length=24)]
    age: Annotated[int, Field(ge=0, le=120)]
    favourite_color: Color
    address: Address


class Step(BaseModel):
    explanation: Annotated[str, Field(max_length=40)]
    output: Annotated[str, Field(max_length=20)]


class Solution(BaseModel):
    steps: Annotated[list[Step], Field(min_length=1, max_length=3)]
    final_answer: int


class Review(BaseModel):
    tags: Annotated[list[Annotated[str, Field(max_length=12)]], Field(min_length=2, max_length=4)]
    mood: Color
    confident: bool


CASES = [(Person, "Describe a fictional person who lives in Paris."),
         (Solution, "What is 3 + 4? Show your steps."),
         (Review, "Tag this review: 'Great phone, the battery lasts long.'")]


@pytest.fixture(scope="module")
def client(start_server):
    srv = start_server("--max-model-len", "1024", "--kv-cache-memory", "0.1", model=None, name="structured-default")
    with openai.OpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def completions_api(client):
    """chat.completions where it has parse and stream (newer clients), else beta.chat.completions."""
    chat = client.chat.completions
    return chat if hasattr(chat, "parse") and hasattr(chat, "stream") else client.beta.chat.completions


def parse(client, model: type[BaseModel], question: str):
    return completions_api(client).parse(model=MODEL, messages=[SYSTEM, {"role": "user", "content": question}],
                                         response_format=model, max_tokens=200, temperature=0)


def test_parse_validates_for_several_schemas(client):
    with ThreadPoolExecutor(len(CASES)) as pool:  # batched together: one model pass serves all three
        answers = list(pool.map(lambda case: parse(client, *case), CASES))
    for (model, _), answer in zip(CASES, answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        parsed = choice.message.parsed
        assert isinstance(parsed, model)
        assert model.model_validate_json(choice.message.content) == parsed  # the text itself validates
    solution = answers[1].choices[0].message.parsed
    assert 1 <= len(solution.steps) <= 3 and 2 <= len(answers[2].choices[0].message.parsed.tags) <= 4


def test_streamed_parse_validates(client):
    with completions_api(client).stream(model=MODEL, messages=[SYSTEM, {"role": "user", "content": CASES[0][1]}],
                                        response_format=Person, max_tokens=200, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = "".join(ev.delta for ev in events if ev.type == "content.delta")
    (done,) = [ev for ev in events if ev.type == "content.done"]
    assert isinstance(done.parsed, Person) and Person.model_validate_json(deltas) == done.parsed
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.parsed == done.parsed
    assert final.choices[0].message.parsed == parse(client, *CASES[0]).choices[0].message.parsed  # as non-streamed
