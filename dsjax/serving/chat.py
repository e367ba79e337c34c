"""Chat messages -> prompt token ids through a chat template (the tokenizer's own, or one the
server was given): transformers renders it for HF tokenizers; for the byte tokenizer of the
random-weight presets, jinja2's sandbox renders it as transformers does."""

from __future__ import annotations

from dsjax.serving.openai_api import ApiError


def render(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    if hasattr(tokenizer, "apply_chat_template"):
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise _no_template()
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    if template is None:
        raise _no_template()
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="", eos_token="")
    return list(tokenizer.encode(text))


def _no_template() -> ApiError:
    return ApiError(400, "this model has no chat template: use /v1/completions, or start the "
                         "server with --chat-template FILE", "messages")
