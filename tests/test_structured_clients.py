"""Client libraries that ask for typed results, unchanged, against a real `ember serve` on the
default model: LangChain's with_structured_output, pydantic-ai, and the OpenAI Agents SDK on
its default Responses model. Each must get a valid instance of the model it asked for."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from conftest import API_KEY

pytestmark = pytest.mark.slow
MODEL = "smol"
ASK = "Name one large city and its country."


class City(BaseModel):
    """A city."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server + "/v1",
        api_key=API_KEY,
        model=MODEL,
        temperature=0,
        max_tokens=120,
        max_retries=0,
    )
    result = llm.with_structured_output(City, method=method).invoke(ASK)
    assert isinstance(result, City)


def test_pydantic_ai_typed_output(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(
        MODEL, provider=OpenAIProvider(base_url=server + "/v1", api_key=API_KEY)
    )
    agent = Agent(model, output_type=City, retries=0)
    result = agent.run_sync(ASK, model_settings={"temperature": 0, "max_tokens": 120})
    assert isinstance(result.output, City)


def test_openai_agents_sdk_on_the_responses_api(server):
    import asyncio

    from agents import (
        Agent,
        ModelSettings,
        Runner,
        set_default_openai_api,
        set_default_openai_client,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    set_default_openai_api("responses")  # the SDK's default, said out loud
    set_default_openai_client(
        AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0),
        use_for_tracing=False,
    )
    agent = Agent(
        name="geographer",
        instructions="Answer with one city.",
        model=MODEL,
        output_type=City,
        model_settings=ModelSettings(temperature=0, max_tokens=120),
    )
    result = asyncio.run(Runner.run(agent, ASK, max_turns=2))
    assert isinstance(result.final_output, City)
