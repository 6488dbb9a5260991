"""Fault injection, a testing aid: `EMBER_FAULT_INJECT`, read once when the engine starts.

Ember's tests use it to prove that a fault in one request fails that request only, and that a
fault in the engine loop fails every open request and stops the server. It is off unless the
variable is set; nothing else reads it. Comma-separated rules:

* `detokenize:ID`: turning token ID into text raises (force ID with `logit_bias`), which must
  fail only the request that generated it.
* `step:ID`: an engine step that schedules a sequence whose prompt holds token ID raises
  outside any one request, as a failing model forward would: the engine loop dies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV = "EMBER_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """Raised where a rule of EMBER_FAULT_INJECT says so."""


@dataclass
class Faults:
    detokenize_ids: frozenset[int] = field(default_factory=frozenset)
    step_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_env(cls) -> Faults:
        rules: dict[str, set[int]] = {"detokenize": set(), "step": set()}
        for rule in filter(None, (r.strip() for r in os.environ.get(ENV, "").split(","))):
            kind, _, value = rule.partition(":")
            if kind not in rules or not value.strip().isdigit():
                raise ValueError(f"{ENV}: unknown rule {rule!r} (detokenize:ID or step:ID)")
            rules[kind].add(int(value))
        return cls(frozenset(rules["detokenize"]), frozenset(rules["step"]))

    def on_detokenize(self, token_id: int) -> None:
        if token_id in self.detokenize_ids:
            raise InjectedFault(f"injected fault: detokenizing token {token_id}")

    def on_step(self, prompts: list[list[int]]) -> None:
        if self.step_ids and any(self.step_ids.intersection(p) for p in prompts):
            raise InjectedFault("injected fault: engine step")
