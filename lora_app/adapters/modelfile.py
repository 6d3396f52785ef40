"""An Ollama Modelfile for an exported GGUF (FROM the file) or for an adapter Ollama converts itself (FROM the base
model as Ollama has it, ADAPTER the adapter's folder): the chat template in Ollama's Go template form, the stop
tokens, the model's default system prompt, and the one-line `ollama create` command.

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
BASE_PLACEHOLDER = "<base model in Ollama>"  # not a name Ollama accepts, so `ollama create` stops on it


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
    return "\n".join([f"FROM ./{gguf_name}", *template_lines(form, system, "the one in the GGUF")]) + "\n"


def adapter_modelfile_text(base: str | None, adapter_dir: str, trained_on: str, form: ChatForm | None,
                           system: str = "", trained_bits: int | None = None) -> str:
    """FROM the base model in Ollama (or a placeholder saying what to put there), ADAPTER ./adapter_dir."""
    # Ollama's docs advise adapters trained on unquantized weights: a QLoRA adapter meets other rounding there
    bits = ([f"# Trained on {trained_bits}-bit MLX weights; Ollama's base is quantized its own way, so answers can "
             "differ a little."] if trained_bits else [])
    if base:
        head = [f"# Ollama adds the adapter to {base}, which must be the model it was trained on ({trained_on}).",
                f"FROM {base}"]
    else:
        head = [f"# FROM must name the model the adapter was trained on ({trained_on}) as Ollama has it:",
                "# a name from ollama.com/library (such as gemma2:2b) or a GGUF file of it; Ollama cannot read the MLX",
                "# folder it was trained on. Replace the next line, or export again with --ollama-base NAME.",
                f"FROM {BASE_PLACEHOLDER}"]
    fallback = "the FROM model's own"
    return "\n".join([*head, *bits, f"ADAPTER ./{adapter_dir}", *template_lines(form, system, fallback)]) + "\n"


def template_lines(form: ChatForm | None, system: str, fallback: str) -> list[str]:
    """TEMPLATE, SYSTEM and the stops of a known chat form; for another form, a comment saying what Ollama uses."""
    if form is None:
        return [f"# The model's chat template is of no form this app knows (ChatML, Llama 3): Ollama uses {fallback}."]
    lines = [f"# Chat template: {form.name}, as the model's own template renders it.",
             f'TEMPLATE """{form.go_template()}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return lines + [f'PARAMETER stop "{s}"' for s in form.stops]


def write_modelfile(folder: Path, gguf_name: str, tokenizer: Any, final: Path) -> dict[str, Any]:
    """Write folder/Modelfile (the export's folder-to-be `final`); returns what the export reports: the template's
    form, the stops, the one-line ollama command."""
    form, system = recognise(tokenizer)
    (Path(folder) / MODELFILE).write_text(modelfile_text(gguf_name, form, system))
    return {**modelfile_report(form, system, final),
            "summary": f"Modelfile: chat template {form.name if form else 'from the GGUF (form not known here)'}"
                       + (f", stops {', '.join(form.stops)}" if form else "")}


def write_adapter_modelfile(folder: Path, adapter_dir: str, base: str | None, trained_on: str, tokenizer: Any,
                            final: Path, trained_bits: int | None = None) -> dict[str, Any]:
    """Write folder/Modelfile for an adapter Ollama converts (FROM `base`, or a placeholder when None); returns
    what the export reports, with the FROM line and whether it still has to be filled in."""
    form, system = recognise(tokenizer)
    text = adapter_modelfile_text(base, adapter_dir, trained_on, form, system, trained_bits)
    (Path(folder) / MODELFILE).write_text(text)
    todo = None if base else (f"replace the FROM line of {Path(final).resolve() / MODELFILE} with {trained_on} as "
                              "Ollama names it (or export again with --ollama-base NAME)")
    return {**modelfile_report(form, system, final), "from": base, "adapter": f"./{adapter_dir}", "todo": todo,
            "summary": f"Modelfile: FROM {base or BASE_PLACEHOLDER + ' (to be replaced)'}, ADAPTER ./{adapter_dir}, "
                       f"chat template {form.name if form else 'from the FROM model (form not known here)'}"
                       + (f", stops {', '.join(form.stops)}" if form else "")}


def modelfile_report(form: ChatForm | None, system: str, final: Path) -> dict[str, Any]:
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(final).name.lower()).strip("-.") or "my-model"
    return {"check": "Modelfile", "chat_template": form.name if form else None,
            "stops": list(form.stops) if form else [], "system": system,
            "ollama": f"ollama create {name} -f {shlex.quote(str(Path(final).resolve() / MODELFILE))}"}
