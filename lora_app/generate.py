"""Generation for the playground, the CLI and the trainer's sample probes, with the chat template applied."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def prompt_tokens(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """The prompt through the model's chat template (as a user turn) when it has one, else plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return list(tokenizer.encode(prompt))


def stream_answer(model: Any, tokenizer: Any, prompt: str, max_tokens: int = 128, temperature: float = 0.0,
                  chat: bool = True) -> Iterator[str]:
    """Yield the answer's text piece by piece (greedy when temperature is 0)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=temperature)
    for response in stream_generate(model, tokenizer, prompt_tokens(tokenizer, prompt, chat),
                                    max_tokens=max_tokens, sampler=sampler):
        yield response.text


def greedy_answer(model: Any, tokenizer: Any, prompt: str, max_tokens: int = 32, stop: Any = None) -> str:
    """The greedy answer; generation ends early once `stop()` is true (a run asked to stop mid-probe)."""
    pieces = []
    for piece in stream_answer(model, tokenizer, prompt, max_tokens):
        pieces.append(piece)
        if stop and stop():
            break
    return "".join(pieces).strip()


def load_for_generation(model: str, adapter: str | None = None, dequantize: bool | None = None) -> tuple:
    """(model, tokenizer), with the adapter applied when one is given."""
    from .adapters import load_adapter
    from .models import load_model

    mlx_model, tokenizer = load_model(model, dequantize)
    if adapter:
        load_adapter(mlx_model, adapter)
        mlx_model.eval()
    return mlx_model, tokenizer
