"""Chat templates and conversational data, in TRL's formats.

A prompt is a string or a list of messages (`{"role": ..., "content": ...}`); a completion, `chosen` or
`rejected` is a string or a list of assistant messages; an SFT example may be one `messages` list. With a
chat template in use (`data.chat_template`: auto = when the tokenizer has one, always, never), the prompt is
rendered by the tokenizer's template with the generation prompt added, and a target completion is the text the
template puts after it (the assistant turn with its end-of-turn marker), so that what is trained is what the
model produces after the rendered prompt. Rendered text already holds the template's special tokens, so it is
tokenised without adding any (`add_special_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass

from rlgen.errors import RlgenError

CHAT_MODES = ("auto", "always", "never")


def is_messages(value) -> bool:
    """Whether `value` is a chat message list (a non-empty list of dicts with a string `role`)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                           for m in value)


def message_problem(value) -> str | None:
    """What is wrong with a chat message list, or None."""
    if not isinstance(value, list) or not value:
        return "must be a string or a non-empty list of messages"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} is a {type(message).__name__}, not an object with 'role' and 'content'"
        if not isinstance(message.get("role"), str) or not message["role"]:
            return f"message {i} has no 'role' string"
        if not isinstance(message.get("content"), str):
            return f"message {i} ({message['role']}) has no 'content' string"
    return None


def message_text(value) -> str:
    """The text of a string or a message list (the contents, one per line): what rewards read of a
    conversational completion."""
    if is_messages(value):
        return "\n".join(str(m.get("content", "")) for m in value)
    return value if isinstance(value, str) else str(value)


def reward_view(record: dict) -> dict:
    """A record as rewards read it: text throughout (a message-list prompt or completion as its contents), the
    same in training, `rlgen score` and `rlgen eval`."""
    flat = {k: message_text(record[k]) for k in ("prompt", "completion") if is_messages(record.get(k))}
    return {**record, **flat} if flat else record


def assistant_messages(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@dataclass
class ChatFormat:
    """How a run turns prompts and completions into model text (one per run: sample, eval, every trainer)."""

    tokenizer: object
    mode: str = "auto"
    system_prompt: str = ""
    key: str = "data.chat_template"  # the setting named in errors

    def __post_init__(self):
        if self.mode not in CHAT_MODES:
            raise RlgenError(f"{self.key} = {self.mode!r}: expected one of {', '.join(CHAT_MODES)}")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.mode == "always" and not has_template:
            raise RlgenError(f"{self.key} = always: the model's tokenizer has no chat template")
        self.active = has_template and self.mode != "never"

    @property
    def add_special_tokens(self) -> bool:
        """Rendered text holds the template's own special tokens: none are added when it is tokenised."""
        return not self.active

    def messages(self, prompt) -> list[dict]:
        """The prompt as a message list (a string is one user message), the system prompt first when set
        and the conversation has none."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def _inactive(self, what: str) -> RlgenError:
        why = "data.chat_template = never" if self.mode == "never" else "the model's tokenizer has no chat template"
        return RlgenError(f"{what} is a chat message list, but {why} (give the text as a string, or a model with a template)")

    def prompt_text(self, prompt) -> str:
        """The model text of a prompt: rendered with the generation prompt when a template is in use."""
        if not self.active:
            if not isinstance(prompt, str):
                raise self._inactive("a prompt")
            return prompt
        return self.tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)

    def completion_text(self, prompt, completion) -> str:
        """The text the model should produce after `prompt_text(prompt)` for a target `completion` (a string
        or assistant messages): the template's assistant turn, end-of-turn marker included. A template that
        renders the conversation so that the prompt is not its prefix gets the bare content."""
        if not self.active:
            if not isinstance(completion, str):
                raise self._inactive("a completion")
            return completion
        turns = assistant_messages(completion) if isinstance(completion, str) else list(completion)
        head = self.prompt_text(prompt)
        full = self.tokenizer.apply_chat_template(self.messages(prompt) + turns, tokenize=False)
        return full[len(head):] if full.startswith(head) else message_text(completion)

    def completion_value(self, prompt, text: str):
        """A generated completion in the shape its prompt came in: assistant messages for a message list."""
        return assistant_messages(text) if isinstance(prompt, list) else text


def chat_format(tokenizer, data_config, key: str = "data.chat_template") -> ChatFormat:
    """The run's ChatFormat from a data config's `chat_template` and `system_prompt` (defaults when absent)."""
    return ChatFormat(tokenizer, getattr(data_config, "chat_template", "auto"), getattr(data_config, "system_prompt", ""), key)
