"""The offline API for scripts and benchmarks, shaped like vLLM's `LLM`.

llm = ember.LLM()                       # the embedded default model
out = llm.generate(["The capital of France is"], ember.SamplingParams(max_tokens=8))
print(out[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from ember.chat.templates import ChatFormatter, resolve_chat_template
from ember.config import EngineConfig, from_env
from ember.engine.core import EngineCore
from ember.engine.request import Logprob, SamplingParams, fan_out


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.config: EngineConfig = from_env(EngineConfig, model=model, **engine_args)
        self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.tokenizer
        template = resolve_chat_template(
            self.config.chat_template, self.tokenizer, self.engine.hf_config
        )
        self.chat_formatter = ChatFormatter(self.tokenizer, template)
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling params runs with: SamplingParams' defaults, but for
        what the model's generation_config.json sets (temperature, top_p, ...), as vLLM's LLM
        takes them. Explicit SamplingParams are used as given."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestResult]:
        """Prompts are strings or token-id lists; results come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        items: list[tuple[str | None, list[int]]] = []
        for p in prompts:
            if isinstance(p, str):
                items.append((p, self.tokenizer.encode(p)))
            else:
                items.append((None, list(p)))
        return self._run(items, sampling_params)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> list[RequestResult]:
        """One conversation (a list of messages) or several. `continue_final_message`: the
        reply continues the last message (then add_generation_prompt must be false)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        items = []
        for conv in conversations:
            kwargs = {
                "add_generation_prompt": add_generation_prompt,
                "tools": tools,
                "continue_final_message": continue_final_message,
            }
            # Ids come from encode(): formats built in code (ChatGLM3, Llama-2) encode each
            # turn separately, which re-tokenizing the rendered text would not reproduce.
            text = self.chat_formatter.render(conv, **kwargs)
            items.append((text, self.chat_formatter.encode(conv, **kwargs)))
        return self._run(items, sampling_params)

    def embed(self, inputs: str | list[str] | list[int] | list[list[int]]) -> list[list[float]]:
        """The model's embedding of each input (strings or token-id lists), as the server's
        /v1/embeddings gives it: the last hidden state, mean-pooled and L2-normalised."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # type: ignore[list-item]
        ids = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        return self.engine.embed_many(ids)

    def _run(
        self,
        items: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None,
    ) -> list[RequestResult]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError("give one SamplingParams, or one per prompt")
        results: list[RequestResult] = []
        owners: dict[str, CompletionOutput] = {}
        for (text, ids), params in zip(items, params_list):
            rid = str(next(self._ids))
            result = RequestResult(rid, text, ids, [])
            # Each of n samples is its own sequence (fan_out: seeds, prompt logprobs).
            for i, p in enumerate(fan_out(params, params.n)):
                sub_id = f"{rid}-{i}"
                out = CompletionOutput(index=i, logprobs=[] if p.logprobs is not None else None)
                result.outputs.append(out)
                owners[sub_id] = out
                self.engine.add_request(sub_id, ids, p)
            results.append(result)
        by_id = {r.request_id: r for r in results}
        while self.engine.has_work():
            for step_out in self.engine.step():
                out = owners[step_out.request_id]
                rid = step_out.request_id.rsplit("-", 1)[0]
                if step_out.prompt_logprobs is not None:
                    by_id[rid].prompt_logprobs = step_out.prompt_logprobs
                out.text += step_out.new_text
                out.token_ids.extend(step_out.new_token_ids)
                if step_out.new_logprobs and out.logprobs is not None:
                    out.logprobs.extend(step_out.new_logprobs)
                    out.cumulative_logprob = sum(lp.logprob for lp in out.logprobs)
                if step_out.finished:
                    out.finish_reason = step_out.finish_reason
                    out.stop_reason = step_out.stop_reason
                    by_id[rid].num_cached_tokens = step_out.num_cached_tokens
        return results
