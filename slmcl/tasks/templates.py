"""Built-in chat templates, for models whose tokenizer has none (pretrained bases such as Gemma 3 270M).

``chat.template`` names a family (``chatml``, ``llama3``, ``gemma``) or gives a Jinja string; the
renderer passes it to ``apply_chat_template`` in place of the tokenizer's own. Each family's
template ends an assistant turn with that family's end-of-turn marker, so training targets learn to
emit it, generation stops on it (``slmcl.models.loading.END_OF_TURN_TOKENS``) and answer
normalization cuts at it (``slmcl.tasks.answers``). The templates follow the families' published
formats in their simplest form (no tools, no images); a model whose tokenizer ships a template
should keep it (leave ``chat.template`` empty).
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma has no system role: a system message is prepended to the first user turn, as Gemma 3's own
# template does; the assistant's role is called "model".
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\\n\\n' %}{% set rest = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}


def is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def resolve_template(value: str) -> str | None:
    """The Jinja text of ``chat.template`` (None: the tokenizer's own)."""
    if not value:
        return None
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if is_jinja(value):
        return value
    raise ValueError(f"must be one of {', '.join(BUILTIN_TEMPLATES)} or a Jinja template string, got {value!r}")


__all__ = ["BUILTIN_TEMPLATES", "is_jinja", "resolve_template"]
