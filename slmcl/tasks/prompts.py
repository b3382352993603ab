"""Prompt rendering: the same text for training, evaluation and the stability pass.

The user message is the task kind's (``TaskKind.user_message``); every built-in kind uses the
study's layout: the task instruction, a blank line, then the example prompt. No system
message unless the spec asks for one; a template that injects its own default (SmolLM2's
does) keeps it, exactly as in the study. A model without a chat template (a pretrained base)
gets a built-in family's (``chat.template``, ``slmcl.tasks.templates``), or ``raw_prompts``
feeds prompts as they are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from slmcl.config.spec import ChatSpec
from slmcl.errors import ModelError
from slmcl.tasks.kinds import TaskKind, default_user_message
from slmcl.tasks.templates import resolve_template


@dataclass(frozen=True)
class PromptRenderer:
    tokenizer: Any
    chat: ChatSpec

    def _messages(self, instruction: str, prompt: str, kind: TaskKind | None) -> list[dict[str, str]]:
        messages = []
        if self.chat.system_prompt:
            messages.append({"role": "system", "content": self.chat.system_prompt})
        content = default_user_message(instruction, prompt) if kind is None else kind.user_message(instruction, prompt)
        messages.append({"role": "user", "content": content})
        return messages

    def _template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        kwargs = dict(self.chat.template_kwargs)
        kwargs.setdefault("enable_thinking", self.chat.enable_thinking)
        template = self._fallback_template()
        if template is not None:
            kwargs["chat_template"] = template
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def _fallback_template(self) -> str | None:
        """``chat.template`` for a tokenizer without a template of its own (None: the tokenizer's own is used).

        Only a model without one takes it, so one experiment can hold an instruct model (its own template)
        and a pretrained base (the named family's) side by side."""
        if getattr(self.tokenizer, "chat_template", None):
            return None
        template = resolve_template(self.chat.template)
        if template is None:
            raise ModelError("the model's tokenizer has no chat template: set chat.template (chatml, llama3, gemma "
                             "or a Jinja string) or chat.raw_prompts: true")
        return template

    def _bos(self) -> str:
        return self._raw_bos

    @functools.cached_property
    def _raw_bos(self) -> str:
        """The BOS text a raw prompt starts with, for tokenizers that add one by default (Gemma: without it
        the model degenerates); prompts are tokenized without special tokens, so it is written out here.
        Read off the tokenizer's behaviour, since its ``add_bos_token`` flag is not reliable across families."""
        bos, bos_id = getattr(self.tokenizer, "bos_token", None), getattr(self.tokenizer, "bos_token_id", None)
        if not bos or bos_id is None:
            return ""
        ids = self.tokenizer("a").input_ids
        return str(bos) if ids and ids[0] == bos_id else ""

    def prompt_text(self, instruction: str, prompt: str, kind: TaskKind | None = None) -> str:
        """The text the model continues from (generation prompt included).

        ``kind`` renders the user message; without one (the stability reference set, which mixes
        tasks) the study's layout is used, which is also what every built-in kind renders.
        """
        if self.chat.raw_prompts:
            return self._bos() + prompt
        return self._template(self._messages(instruction, prompt, kind), add_generation_prompt=True)

    def full_text(self, instruction: str, prompt: str, target: str, kind: TaskKind | None = None) -> str:
        """Prompt plus the assistant's answer and the template's end-of-turn, for training."""
        if self.chat.raw_prompts:
            return self._bos() + prompt + target + (self.tokenizer.eos_token or "")
        messages = self._messages(instruction, prompt, kind) + [{"role": "assistant", "content": target}]
        return self._template(messages, add_generation_prompt=False)

    def fingerprint(self) -> dict[str, Any]:
        """What the rendering depends on, for cache keys."""
        return {
            "system_prompt": self.chat.system_prompt,
            "template_kwargs": self.chat.template_kwargs,
            "enable_thinking": self.chat.enable_thinking,
            "raw_prompts": self.chat.raw_prompts,
            "chat_template": None if self.chat.raw_prompts else (
                getattr(self.tokenizer, "chat_template", None) or self._fallback_template()),
            "bos": self._bos() if self.chat.raw_prompts else None,
        }
