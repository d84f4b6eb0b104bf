"""`lora-tune data`: show what will be trained, token by token, without loading model weights."""

from __future__ import annotations

import itertools

from rich.table import Table
from rich.text import Text

from . import data, models, output, pairs, prompts
from .methods import METHODS
from .recipe import Recipe

console = output.console()
TRAINED, MASKED = "bold green", "dim"
# Where styles cannot show (a pipe, a CI log, a file, NO_COLOR), trained text is put between these.
OPEN, CLOSE = "[[", "]]"


def pieces(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The sample as (text, trained) pieces of whole characters, about one per token.

    A byte-level token can hold part of a character (Chinese, emoji), which decodes alone as
    U+FFFD. So a piece is what its tokens add to the text decoded before them, and a token that
    ends inside a character waits for the next one; such a piece is trained if any of its tokens is.
    """

    def decode(ids):
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    result, context, start = (
        [],
        0,
        0,
    )  # decoding from a token or two before keeps word-initial spaces
    for end in range(1, len(input_ids) + 1):
        text = decode(input_ids[context:end])
        if text.endswith("\ufffd") and end < len(input_ids):
            continue
        before = decode(input_ids[context:start])
        result.append((text[len(before) :], any(label != -100 for label in labels[start:end])))
        context, start = start, end
    return result


def render_sample(tokenizer, input_ids: list[int], labels: list[int], mark: bool = False) -> Text:
    """The sample's text, trained tokens highlighted and masked ones dimmed; with `mark`, each run of
    trained text is also put between OPEN and CLOSE, for output that shows no styles."""
    return styled(pieces(tokenizer, input_ids, labels), mark)


def styled(found: list[tuple[str, bool]], mark: bool) -> Text:
    """(text, trained) pieces as rich Text: trained runs highlighted (and marked), others dimmed."""
    text = Text()
    for trained, run in itertools.groupby(found, key=lambda piece: piece[1]):
        style = TRAINED if trained else MASKED
        if mark and trained:
            text.append(OPEN, style=style)
        for piece, _ in run:
            text.append(piece, style=style)
        if mark and trained:
            text.append(CLOSE, style=style)
    return text


def legend(mark: bool) -> Text:
    if mark:
        return Text(
            f"Legend: {OPEN}trained{CLOSE} text is in the loss; the rest is masked (not in the loss)"
        )
    return Text.assemble(
        "Legend: ", ("trained", TRAINED), " / ", ("masked (not in the loss)", MASKED)
    )


def answer(tokenizer, prompt_ids: list[int], ids: list[int], room: int, mark: bool) -> Text:
    """An answer as trained after its prompt: its tokens within max_length (`room`) highlighted,
    decoded after the prompt's so that word-initial spaces show; the cut ones counted."""
    kept = ids[: max(room, 0)]
    found = pieces(tokenizer, prompt_ids + kept, [-100] * len(prompt_ids) + kept)
    start = next((i for i, (_, trained) in enumerate(found) if trained), len(found))
    text = styled(found[start:], mark)
    cut = len(ids) - len(kept)
    if cut:
        text.append(f" ({cut} token{'s' * (cut > 1)} cut at max_length)", style=MASKED)
    return text


def show_pair(tokenizer, row: dict, max_length: int, mark: bool, title: str) -> None:
    """A preference sample: the prompt (masked), then each answer with its trained tokens; a kto
    row (prompt, completion, label) with its label."""
    if "chosen" in row:
        prompt_ids, *answers = pairs.tokenize_pair(tokenizer, row)
        names = ["chosen", "rejected"]
    else:
        prompt_ids, *answers = pairs.tokenize_unpaired(tokenizer, row)
        names = ["completion"]
        title += f", label {str(row['label']).lower()}"
    sizes = ", ".join(f"{name} {len(ids)}" for name, ids in zip(names, answers, strict=True))
    console.rule(f"{title} (prompt {len(prompt_ids)} tokens, {sizes})")
    prompt = render_sample(tokenizer, prompt_ids, [-100] * len(prompt_ids), mark)
    console.print(Text("prompt: ").append_text(prompt))
    for name, ids in zip(names, answers, strict=True):
        room = max_length - len(prompt_ids)
        console.print(Text(f"{name}: ").append_text(answer(tokenizer, prompt_ids, ids, room, mark)))


def show_prompt(tokenizer, row: dict, mark: bool, title: str) -> None:
    """A GRPO sample: the prompt as the model reads it before generating (nothing of it is
    trained), then the other columns, which the reward functions receive."""
    ids = prompts.tokenize_prompt(tokenizer, row["prompt"])
    console.rule(f"{title} (prompt {len(ids)} tokens; completions are sampled and rewarded)")
    console.print(
        Text("prompt: ").append_text(render_sample(tokenizer, ids, [-100] * len(ids), mark))
    )
    for column, value in row.items():
        if column != "prompt":
            console.print(Text(f"{column} (to the rewards): {value}"))


def show_samples(tokenizer, train, method, max_length: int, n: int, mark: bool) -> None:
    for i in range(min(n, len(train))):
        row = train[i]
        if method.data == "prompts":
            show_prompt(tokenizer, row, mark, f"sample {i}")
            continue
        if method.data != "sft":
            show_pair(tokenizer, row, max_length, mark, f"sample {i}")
            continue
        console.rule(f"sample {i} ({len(row['input_ids'])} tokens)")
        console.print(render_sample(tokenizer, row["input_ids"], row["labels"], mark))


def run(recipe: Recipe, n: int = 3) -> dict:
    """Print N rendered training samples and the data statistics; return the statistics. For a
    preference trainer, a sample is the prompt and its answers as TRL trains them."""
    tokenizer = models.load_tokenizer(recipe.model)
    data.prepare_tokenizer(tokenizer, recipe.data, recipe.model.id)
    method = METHODS[recipe.trainer]
    if method.data == "sft":
        train, _, stats = data.load_datasets(recipe.data, tokenizer)
    elif method.data == "prompts":
        train, _, stats = prompts.load_datasets(recipe.data, tokenizer, method)
    else:
        train, _, stats = pairs.load_datasets(recipe.data, tokenizer, method)
    mark = console.no_color or console.color_system is None  # styles will not show
    console.print(legend(mark))
    show_samples(tokenizer, train, method, recipe.data.max_length, n, mark)
    sampled = method.data == "prompts"  # GRPO trains no token of the data: count the prompts'
    table = Table(title="data", show_header=True)
    for column in (
        "split",
        "rows",
        "samples",
        "skipped",
        f"truncated to {recipe.data.max_length}",
        "length min/median/p95/max",
        "prompt tokens per epoch" if sampled else "trained tokens per epoch",
    ):
        table.add_column(column, overflow="fold")
    summaries = {name: s.summary() for name, s in stats.items()}
    for name, s in summaries.items():
        length = s.get("length", {})
        skipped = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items()) or "0"
        table.add_row(
            name,
            f"{s['rows']:,}",
            f"{s['samples']:,}",
            skipped,
            f"{s['truncated']:,}",
            "/".join(f"{length.get(k, 0):g}" for k in ("min", "median", "p95", "max")),
            f"{s['tokens' if sampled else 'trained_tokens']:,}",
        )
    console.print(table)
    return summaries
