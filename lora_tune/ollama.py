"""An Ollama Modelfile for an exported GGUF: the file (and adapter), the chat template in
Ollama's Go template syntax, the stop tokens and the model's generation defaults.

The template is not translated by pattern: it is read off the tokenizer's own Jinja template by
rendering conversations whose contents are markers, which gives each role's text before and
after its content and the generation prompt. Many chat templates (ChatML, Llama 3, Gemma and
plain role-tagged ones) are such role-tagged turns. The result is checked by
rendering multi-turn conversations both ways; a template that does something else (a default
system prompt, Llama 2's system-in-first-turn) gets no TEMPLATE line: Ollama then uses one of
its own templates only if the GGUF's is close to it, and the report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
MARK = "\u2063{}\u2063"  # an invisible separator around a role's marker text
PROBES = (
    ("user",),
    ("user", "assistant"),
    ("user", "assistant", "user"),
    ("user", "assistant", "user", "assistant"),
    ("system", "user", "assistant", "user"),
)


@dataclass
class Turns:
    """A role-tagged chat template: text before and after each role's content, the generation
    prompt, and the text the whole conversation starts with (BOS, which llama.cpp adds itself)."""

    start: str
    before: dict[str, str]
    after: dict[str, str]
    generation: str

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.start + "".join(
            self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages
        )
        return text + (self.generation if add_generation_prompt else "")

    def go_template(self) -> str:
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
            f"{go_text(self.before[role])}{{{{ .Content }}}}{go_text(self.after[role])}"
            for i, role in enumerate(r for r in ROLES if r in self.before)
        )
        return f"{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{go_text(self.generation)}"


def go_text(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def conversation(roles: tuple[str, ...]) -> list[dict]:
    return [{"role": r, "content": MARK.format(f"{r}{i}")} for i, r in enumerate(roles)]


def render(tokenizer, template: str, messages: list[dict], generation: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )
    except Exception:  # a template may refuse some role orders (e.g. a system turn)
        return None


def pieces(tokenizer, template: str, roles: tuple[str, ...], generation: bool = False):
    """The rendered conversation of `roles` cut at each message's content: len(roles)+1 texts."""
    messages = conversation(roles)
    text = render(tokenizer, template, messages, generation)
    cut = []
    for message in messages:
        if text is None or message["content"] not in text:
            return None
        head, text = text.split(message["content"], 1)
        cut.append(head)
    return [*cut, text]


def read_turns(tokenizer, template: str) -> Turns | None:
    """The template's role-tagged turns, or None when it is not one. The user turn is read
    alone; the assistant turn after a user turn, the system turn before one."""
    user = pieces(tokenizer, template, ("user",))
    pair = pieces(tokenizer, template, ("user", "assistant"))
    prompted = pieces(tokenizer, template, ("user",), generation=True)
    if user is None or pair is None or prompted is None or not prompted[1].startswith(user[1]):
        return None
    bos = tokenizer.bos_token or ""
    start = bos if bos and user[0].startswith(bos) else ""
    before, after = {"user": user[0][len(start) :]}, {"user": user[1]}
    if not pair[1].startswith(user[1]):
        return None
    before["assistant"], after["assistant"] = pair[1][len(user[1]) :], pair[2]
    system = pieces(tokenizer, template, ("system", "user"))
    if system is not None and system[0].startswith(start) and system[1].endswith(before["user"]):
        before["system"] = system[0][len(start) :]
        after["system"] = system[1][: len(system[1]) - len(before["user"])]
    turns = Turns(start, before, after, prompted[1][len(user[1]) :])
    return turns if reproduces(turns, tokenizer, template) else None


def reproduces(turns: Turns, tokenizer, template: str) -> bool:
    """Whether the turns render every probe conversation exactly as the Jinja template does."""
    for roles in PROBES:
        if not set(roles) <= set(turns.before):
            continue
        messages = conversation(roles)
        for generation in (False, True):
            expected = render(tokenizer, template, messages, generation)
            if expected is not None and expected != turns.render(messages, generation):
                return False
    return True


def stop_words(tokenizer, turns: Turns | None) -> list[str]:
    """EOS, and the special token that ends an assistant turn (<|im_end|>, <|eot_id|>, ...)."""
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    words = [tokenizer.eos_token] if tokenizer.eos_token else []
    if turns is not None:
        words += [s for s in sorted(specials) if s and s in turns.after["assistant"]]
    return list(dict.fromkeys(w for w in words if w.strip()))


# transformers' sampling defaults, written out because Ollama's own differ (top_k 40, top_p 0.9,
# repeat_penalty 1.1) and would apply to every key the model's generation config leaves out.
HF_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
OLLAMA_NAMES = {"repetition_penalty": "repeat_penalty"}


def generation_parameters(model_dir: Path) -> dict:
    """Ollama PARAMETERs that generate as transformers does with the model's generation config:
    greedy (temperature 0) unless it samples, and no repetition penalty unless it has one."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    penalty = {"repeat_penalty": config.get("repetition_penalty", 1.0)}
    if not config.get("do_sample"):
        return {"temperature": 0} | penalty
    values = HF_SAMPLING | {k: config[k] for k in HF_SAMPLING if config.get(k) is not None}
    return {OLLAMA_NAMES.get(k, k): v for k, v in values.items()}


def modelfile(
    source: str, tokenizer, model_dir: Path, adapter: str | None = None
) -> tuple[str, dict]:
    """The Modelfile's text, and what the report records of its template."""
    template = tokenizer.chat_template
    turns = read_turns(tokenizer, template) if template else None
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if turns is not None and '"""' in turns.go_template():
        turns = None  # a Modelfile cannot quote it
    if turns is not None:
        lines.append(f'TEMPLATE """{turns.go_template()}"""')
    lines += [f"PARAMETER stop {json.dumps(word)}" for word in stop_words(tokenizer, turns)]
    lines += [f"PARAMETER {k} {v}" for k, v in generation_parameters(model_dir).items()]
    if template and turns is None:
        note = (
            "not translated: Ollama uses one of its own templates only when the GGUF's is close "
            "to it, else the bare prompt; write TEMPLATE by hand if chats matter"
        )
    else:
        note = "translated and checked on 5 conversations" if turns else "none (a base model)"
    return "\n".join(lines) + "\n", {"chat_template": note, "translated": turns is not None}
