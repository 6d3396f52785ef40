"""An Ollama Modelfile for an exported GGUF: FROM the file, the chat template in Ollama's Go template form, the
stop tokens, the model's default system prompt, and the one-line `ollama create` command.

The model's own (Jinja) chat template is recognised by rendering it: each known form (ChatML, Llama 3) is a few
pieces, a turn `role, content -> text` and the assistant's prefix, and the form applies only when the Jinja
template renders a probe conversation exactly as those pieces do. The Go template is written from the same
pieces, so what Ollama sends the model is what the model was trained on. A template of no known form is left
out: Ollama then uses the GGUF's own, and the export says so.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatForm:
    name: str
    turn: str  # with {role} and {content}
    prefix: str  # what starts the assistant's answer
    stops: tuple[str, ...]
    bos: str = ""  # a begin-of-text token the Jinja template writes first (llama.cpp adds it itself)

    def render(self, messages: list[dict[str, str]]) -> str:
        return "".join(self.turn.format(role=m["role"], content=m["content"]) for m in messages) + self.prefix

    def go_template(self) -> str:
        """Ollama's TEMPLATE: the system prompt (Ollama's .System), then each user / assistant message."""
        system = self.turn.format(role="system", content="{{ .System }}")
        turn = self.turn.format(role="{{ .Role }}", content="{{ .Content }}")
        return (f"{{{{- if .System }}}}{system}{{{{ end }}}}"
                f"{{{{- range .Messages }}}}{{{{ if ne .Role \"system\" }}}}{turn}{{{{ end }}}}{{{{ end }}}}"
                f"{self.prefix}")


FORMS = (
    ChatForm("ChatML", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
             ("<|im_end|>", "<|im_start|>")),
    ChatForm("Llama 3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
             ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"), bos="<|begin_of_text|>"),
)
PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def recognise(tokenizer: Any) -> tuple[ChatForm | None, str]:
    """(the form the tokenizer's chat template has, its default system prompt or ""), or (None, "")."""
    def render(messages: list[dict[str, str]]) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - no template, or one that refuses the probe
            return None

    for form in FORMS:
        text = render(PROBE)
        if text is None or text.removeprefix(form.bos) != form.render(PROBE):
            continue
        alone = (render(PROBE[1:]) or "").removeprefix(form.bos)
        if alone == form.render(PROBE[1:]):
            return form, ""
        head = form.turn.format(role="system", content="\0").split("\0")
        rest = form.render(PROBE[1:])
        if alone.startswith(head[0]) and alone.endswith(head[1] + rest):
            return form, alone[len(head[0]):len(alone) - len(head[1] + rest)]
        return None, ""  # a default system prompt in a shape we do not know
    return None, ""


def modelfile_text(gguf_name: str, form: ChatForm | None, system: str = "") -> str:
    lines = [f"FROM ./{gguf_name}"]
    if form is None:
        lines.append("# The model's chat template is of no form this app knows (ChatML, Llama 3): Ollama uses "
                     "the one in the GGUF.")
    else:
        lines.append(f"# Chat template: {form.name}, as the model's own template renders it.")
        lines.append(f'TEMPLATE """{form.go_template()}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in form.stops]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer: Any, final: Path) -> dict[str, Any]:
    """Write folder/Modelfile (the export's folder-to-be `final`); returns what the export reports: the template's
    form, the stops, the one-line ollama command."""
    form, system = recognise(tokenizer)
    (Path(folder) / MODELFILE).write_text(modelfile_text(gguf_name, form, system))
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(final).name.lower()).strip("-.") or "my-model"
    return {"check": "Modelfile", "chat_template": form.name if form else None,
            "stops": list(form.stops) if form else [], "system": system,
            "ollama": f"ollama create {name} -f {shlex.quote(str(Path(final).resolve() / MODELFILE))}",
            "summary": f"Modelfile: chat template {form.name if form else 'from the GGUF (form not known here)'}"
                       + (f", stops {', '.join(form.stops)}" if form else "")}
