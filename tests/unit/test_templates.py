"""Built-in chat templates for models without one: each family's markers, the end-of-turn in training
targets, and the errors that name the setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from slmcl.config.spec import ChatSpec, spec_from_dict
from slmcl.errors import ModelError, SpecError
from slmcl.tasks.prompts import PromptRenderer
from tests.conftest import tiny_spec_dict

FAMILIES = {  # template -> (start of a user turn, the assistant's header, end of turn)
    "chatml": ("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "<|eot_id|>"),
    "gemma": ("<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>"),
}


@pytest.fixture(scope="module")
def tokenizer(embedded_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.chat_template = None  # as a pretrained base's tokenizer: no template of its own
    return tok


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_renders_its_turns_and_ends_the_answer_with_its_marker(tokenizer: Any, family: str) -> None:
    user, assistant, end = FAMILIES[family]
    r = PromptRenderer(tokenizer, ChatSpec(template=family))
    prompt = r.prompt_text("Pick one.", "A or B?")
    full = r.full_text("Pick one.", "A or B?", "B")
    assert user + "Pick one.\n\nA or B?" + end in prompt
    assert prompt.endswith(assistant)
    assert full.startswith(prompt)  # the prompt is a prefix: its tokens can be masked out of the loss
    assert full[len(prompt):].rstrip("\n") == "B" + end  # the target teaches the end-of-turn marker


def test_gemma_folds_a_system_prompt_into_the_first_user_turn(tokenizer: Any) -> None:
    r = PromptRenderer(tokenizer, ChatSpec(template="gemma", system_prompt="Be brief."))
    text = r.prompt_text("Pick one.", "A or B?")
    assert "<start_of_turn>system" not in text
    assert "<start_of_turn>user\nBe brief.\n\nPick one.\n\nA or B?<end_of_turn>" in text


def test_a_jinja_string_is_used_as_given(tokenizer: Any) -> None:
    jinja = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}>{% endif %}")
    assert PromptRenderer(tokenizer, ChatSpec(template=jinja)).prompt_text("I", "P") == "[user] I\n\nP\n>"


def test_no_template_anywhere_is_one_clear_error(tokenizer: Any) -> None:
    with pytest.raises(ModelError, match="no chat template: set chat.template"):
        PromptRenderer(tokenizer, ChatSpec()).prompt_text("I", "P")
    assert PromptRenderer(tokenizer, ChatSpec(raw_prompts=True)).prompt_text("I", "P") == "P"


def test_the_template_is_part_of_the_rendering_fingerprint(tokenizer: Any) -> None:
    a = PromptRenderer(tokenizer, ChatSpec(template="chatml")).fingerprint()
    b = PromptRenderer(tokenizer, ChatSpec(template="gemma")).fingerprint()
    assert a != b  # cached base evaluations and distributions of one never serve the other


@pytest.mark.parametrize(("chat", "message"), [
    ({"template": "vicuna"}, "chat.template: must be one of chatml, llama3, gemma or a Jinja template string"),
    ({"template": "gemma", "raw_prompts": True}, "chat.template: has no effect with chat.raw_prompts: true"),
])
def test_bad_template_settings_name_the_field(tmp_path: Path, data_dir: Path, chat: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        spec_from_dict(tiny_spec_dict(tmp_path, data_dir, tmp_path / "out", chat=chat), check_files=False)


def test_a_model_with_its_own_template_keeps_it(embedded_dir: Path) -> None:
    """One experiment can hold an instruct model and a base: chat.template serves only the one without."""
    own = AutoTokenizer.from_pretrained(embedded_dir)  # SmolLM2's ChatML template, with its system prompt
    text = PromptRenderer(own, ChatSpec(template="gemma")).prompt_text("I", "P")
    assert "<start_of_turn>" not in text and text.startswith("<|im_start|>system\n")


class _BosTokenizer:
    """A tokenizer that adds a BOS by default (as Gemma's does) and says nothing about it in a flag."""

    bos_token, bos_token_id, eos_token, chat_template, add_bos_token = "<bos>", 2, "<eos>", None, False

    def __call__(self, text: str, **_: Any) -> Any:
        return type("Enc", (), {"input_ids": [2, 7]})()


def test_raw_prompts_start_with_the_bos_a_tokenizer_adds(tokenizer: Any) -> None:
    raw = ChatSpec(raw_prompts=True)
    assert PromptRenderer(_BosTokenizer(), raw).prompt_text("I", "P") == "<bos>P"  # tokenized without specials
    assert PromptRenderer(_BosTokenizer(), raw).full_text("I", "P", " B") == "<bos>P B<eos>"
    assert PromptRenderer(tokenizer, raw).prompt_text("I", "P") == "P"  # SmolLM2 adds none
