"""OpenAI request and response models (pydantic v2), in one place so the API surface can be
audited against OpenAI's. Unknown request fields are accepted and ignored, as OpenAI-compatible
servers do, so clients that send newer fields keep working.
"""

from __future__ import annotations

import re
import time
import typing
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ember.chat.tool_parsers import tool_call_id


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _int_only(annotation: Any) -> bool:
    """Whether a field takes an int but not a float (n, max_tokens, seed...)."""
    members = typing.get_args(annotation) or (annotation,)
    return int in members and float not in members


def _null_is_a_value(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(
        isinstance(m, dict) and m.get("type") == "null" for m in prop.get("anyOf", ())
    )


def _nullable_optionals(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """/openapi.json: every optional field also takes null (see `_read_as_openai_does`)."""
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        key = field.alias or name
        prop = props.get(key)
        if prop is None or field.is_required() or _null_is_a_value(prop):
            continue
        meta = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        props[key] = {"anyOf": [prop, {"type": "null"}], **meta}


class OpenAIBase(BaseModel):
    # strict: JSON types as OpenAI checks them, so "10", true and 1 are not read as 10, 1 and
    # true (each is a 400 naming the field); /openapi.json then tells the truth to fuzzers.
    # NaN and Infinity (which Python's JSON reader takes) are no numbers: "finite number".
    model_config = ConfigDict(
        extra="allow", strict=True, allow_inf_nan=False, json_schema_extra=_nullable_optionals
    )

    @model_validator(mode="before")
    @classmethod
    def _read_as_openai_does(cls, data: Any) -> Any:
        """An optional field sent as null takes its default, as OpenAI reads it: clients that
        write every field ("stream": null, "n": null) must not get a 400. A required field
        sent as null is still an error. A whole float where an int goes (max_tokens: 256.0,
        from arithmetic in client code) is that int, as JSON Schema's integer allows."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        out = {}
        for k, v in data.items():
            field = fields.get(k)
            if field is None:
                out[k] = v
            elif v is None and not field.is_required():
                continue
            elif isinstance(v, float) and v.is_integer() and _int_only(field.annotation):
                out[k] = int(v)
            else:
                out[k] = v
        return out


# Limits on what one request may ask for, so that a single request cannot tie up the server;
# beyond them a request gets 400 naming the field (they are also in /openapi.json).
MAX_N = 128  # n, best_of
MAX_SEQUENCES = 256  # prompts x best_of in one /v1/completions request
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_EMBEDDING_INPUTS = 2048  # inputs in one /v1/embeddings request (OpenAI's limit)
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_MESSAGES = 2048  # messages in one chat request
MAX_CONTENT_PARTS = 256  # content parts in one message
MAX_TOOLS = 128
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]


def _inputs(max_items: int) -> Any:
    """A prompt or embedding input: text, texts, token ids, or lists of token ids; never
    empty, and at most `max_items` of them."""
    return (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=max_items)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]],
            Field(min_length=1, max_length=max_items),
        ]
    )


Inputs = _inputs(MAX_PROMPTS)
EmbeddingInputs = _inputs(MAX_EMBEDDING_INPUTS)


# ------------------------------------------------------------------ shared pieces


class StreamOptions(OpenAIBase):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk also carries the usage so far.
    continuous_usage_stats: bool = False


class JsonSchemaFormat(OpenAIBase):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBase):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(OpenAIBase):
    """Sampling fields shared by chat and text completions (OpenAI's plus vLLM's extensions)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0: the top token alone (NextChat sends it)
    # One string of any length (up to MAX_STOP_CHARS), or a list of at most MAX_STOP (checked
    # below: a max_length here would count a single string's characters).
    stop: StopString | list[StopString] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM takes it
    user: str | None = None
    # extensions
    top_k: int | None = Field(
        None, ge=-1, description="Keep the k most likely tokens; 0 or -1: all."
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="Drop tokens less likely than min_p times the top token."
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0,
        description="Over prompt and output, shrink the logits of tokens seen (>1 penalises).",
    )
    min_tokens: int = Field(0, ge=0, description="Tokens generated before eos or stops count.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")
    stop_token_ids: list[int] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="Token ids that end the output."
    )
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    include_stop_str_in_output: bool = Field(
        False, description="Keep the stop string that ended the output in its text."
    )
    return_tokens_as_token_ids: bool = Field(
        False,
        description='With logprobs, name each token "token_id:N" (vLLM\'s): tokens that hold '
        "part of a character all read as U+FFFD otherwise.",
    )
    allowed_token_ids: list[TokenId] | None = Field(
        None, min_length=1, max_length=MAX_LOGIT_BIAS, description="Sample only these token ids."
    )
    bad_words: list[StopString] | None = Field(
        None, max_length=MAX_STOP, description="Words the output may not contain."
    )
    truncate_prompt_tokens: int | None = Field(
        None,
        ge=-1,
        description="Keep only the prompt's last k tokens; -1: as many as the context holds.",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Each prompt token's logprob and the k likeliest at its place (not streamed).",
    )
    structured_outputs: dict[str, Any] | None = Field(
        None,
        description='Constrain the output as vLLM does: {"json": schema}, {"regex": ...}, '
        '{"choice": [...]}, {"grammar": lark} or {"json_object": true}.',
    )
    # vLLM's older names for the same constraints, which many clients still send.
    guided_json: dict[str, Any] | str | None = Field(None, description="structured_outputs.json")
    guided_regex: str | None = Field(None, description="structured_outputs.regex")
    guided_choice: list[str] | None = Field(None, description="structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="structured_outputs.grammar")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if isinstance(v, str):
            return [v]
        if v is not None and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v


def _unset(value: Any) -> bool:
    return value is None


class PromptLogprob(BaseModel):
    """vLLM's shape: one of the tokens considered at a prompt position."""

    logprob: float
    rank: int
    decoded_token: str


# Per prompt token (None for the first): token id -> its logprob, the prompt's own token first.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


# ------------------------------------------------------------------ chat


_FUNCTION_NAME = re.compile(r"[\w.:-]{1,64}")


class FunctionDefinition(OpenAIBase):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # forced calls always follow the schema; auto ones are free

    @field_validator("name")
    @classmethod
    def _callable_name(cls, name: str) -> str:
        # OpenAI's rule is [a-zA-Z0-9_-]{1,64}; dots and colons (namespaced tools) pass too. A
        # name a call cannot spell (empty, spaces, quotes) would only come back as text.
        if not _FUNCTION_NAME.fullmatch(name):
            raise ValueError("a function name is 1 to 64 letters, digits, _, -, . or :")
        return name


class ToolDefinition(OpenAIBase):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionCall(OpenAIBase):
    name: str
    arguments: str


class ToolCall(OpenAIBase):
    id: str = Field(default_factory=tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(OpenAIBase):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBase):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = Field(
        None, validate_default=True
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, validate_default=True)
    function_call: FunctionCall | None = None  # the legacy form of one tool call

    @field_validator("content")
    @classmethod
    def _has_content(cls, content: Any, info: ValidationInfo) -> Any:
        # As OpenAI's API: what a user or the system says is required; only an assistant
        # message (with calls) and a tool result may leave it out.
        role = info.data.get("role")
        if content is None and role in ("system", "developer", "user"):
            raise ValueError(f"a {role} message needs content (a string or parts)")
        return content

    @field_validator("tool_call_id")
    @classmethod
    def _names_its_call(cls, call_id: str | None, info: ValidationInfo) -> str | None:
        # As OpenAI's API: a tool result says which call it answers (a template that pairs
        # results with calls would otherwise pair them by guess). The legacy `function` role
        # names its function instead.
        if not call_id and info.data.get("role") == "tool":
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return call_id


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}; checked
    # by the route against `tools`, so a bad value gets a message that names the problem
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated forms of tools and tool_choice, still sent by older clients: the
    # route runs them as tools, and the reply carries message.function_call.
    functions: list[FunctionDefinition] | None = Field(None, max_length=MAX_TOOLS)
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None  # only ["text"] is served
    add_generation_prompt: bool = True
    # vLLM's: the last message stays open and the reply continues it (an answer's prefill).
    # Left unset, add_generation_prompt then counts as false.
    continue_final_message: bool = False
    # vLLM's: when the last message is the assistant's, the reply starts with its text.
    echo: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    # Only in replies to requests that used the legacy `functions`.
    function_call: FunctionCall | None = Field(None, exclude_if=_unset)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=_unset)


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: DeltaFunctionCall | None = Field(None, exclude_if=_unset)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's, in the chunk that ends a choice


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------ responses


class ResponsesRequest(OpenAIBase):
    """/v1/responses, stateless: items are checked by the route, so a bad one gets a message
    that names it."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0: the top token alone (NextChat sends it)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    # "message.output_text.logprobs" asks for each output token's logprob (and top_logprobs).
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM takes it
    # "auto": an input past the context window drops its oldest turns until it fits.
    truncation: Literal["auto", "disabled"] | None = None


# ------------------------------------------------------------------ completions


class CompletionRequest(SamplingFields):
    prompt: Inputs
    suffix: str | None = None
    # 0 only with echo: the prompt comes back (with its logprobs) and nothing is generated.
    # Unset: --default-max-tokens, else 16 (OpenAI's and vLLM's default here).
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    response_format: ResponseFormat | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=_unset)


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------ embeddings


class EmbeddingRequest(OpenAIBase):
    model: str | None = None
    input: EmbeddingInputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM's: embed only each input's last k tokens (-1: as many as the model takes).
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


# ------------------------------------------------------------------ models, tokenize


def _model_permission() -> dict[str, Any]:
    """What vLLM's (and OpenAI's former) model cards say a client may do with the model."""
    return {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": int(time.time()),
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ember"
    root: str | None = None
    parent: str | None = None  # as vLLM's cards: a fine-tune's base model; none here
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=lambda: [_model_permission()])
    # Weights in compute: "none", "int8-channel", "int4-g32-min", "gguf:Q4_1,Q8_0", ...
    quantization: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _prompt_or_messages(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """/openapi.json: a tokenize body has exactly one of prompt and messages, not null (the
    route refuses the rest)."""
    _nullable_optionals(schema, model)
    schema["oneOf"] = [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
        for name in ("prompt", "messages")
    ]


class TokenizeRequest(OpenAIBase):
    model_config = ConfigDict(json_schema_extra=_prompt_or_messages)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)  # rendered as chat
    tool_choice: str | dict[str, Any] | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=MAX_TOOLS)
    function_call: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False  # vLLM's: each token's vocabulary string too


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[TokenId]
