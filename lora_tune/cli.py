"""The `lora-tune` command line. Each command parses its arguments and calls one function.

Heavy libraries (torch, transformers, peft, trl) are imported inside the commands, so
`lora-tune --help` answers at once.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError

app = typer.Typer(
    help="Turn a YAML recipe into a LoRA fine-tuned, evaluated and verified merged model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_debug = False
ALLOW_PICKLE = "Also load pickle-based .bin weights, which can run code when loaded (default: safetensors only)."


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for user errors too.")
    ] = False,
):
    global _debug
    _debug = debug


# Each command's arguments and options, named once here so that the commands read as one screen.
RecipeFile = Annotated[Path, typer.Argument(help="The YAML recipe.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE)]
TrainSet = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable)."
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check recipe, data and target modules against the model's config and print the plan; "
        "load no weights, write nothing.",
    ),
]
Resume = Annotated[
    str,
    typer.Option(
        "--resume",
        help="auto: continue from the run directory's latest complete checkpoint, if any; "
        "never: start over; or a checkpoint folder.",
    ),
]
NumProcesses = Annotated[
    int,
    typer.Option(
        "--num-processes",
        "-n",
        min=1,
        help="Launch this many processes through accelerate (one per GPU; "
        "with several machines, in total).",
    ),
]
AccelerateConfig = Annotated[
    Path | None,
    typer.Option(
        "--accelerate-config", help="An accelerate config file (see configs/) to launch with."
    ),
]
NumMachines = Annotated[
    int, typer.Option(min=1, help="Machines taking part; run the command on each.")
]
MachineRank = Annotated[int, typer.Option(min=0, help="This machine's rank, 0 on the main one.")]
MainProcessIp = Annotated[str | None, typer.Option(help="Address of the machine of rank 0.")]
MainProcessPort = Annotated[int | None, typer.Option(help="Port the machine of rank 0 listens on.")]
Memory = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="Memory one process may use, e.g. 24GiB: plan for another machine, or cap a CPU run "
        "(default: the GPU's memory, or the RAM free now).",
    ),
]
ForceMemory = Annotated[
    bool,
    typer.Option(
        "--force", help="Train even where the memory estimate exceeds the memory available."
    ),
]


@app.command()
def train(
    recipe: RecipeFile,
    set_: TrainSet = None,
    dry_run: DryRun = False,
    resume: Resume = "auto",
    num_processes: NumProcesses = 1,
    accelerate_config: AccelerateConfig = None,
    num_machines: NumMachines = 1,
    machine_rank: MachineRank = 0,
    main_process_ip: MainProcessIp = None,
    main_process_port: MainProcessPort = None,
    memory: Memory = None,
    force: ForceMemory = False,
):
    """Fine-tune a model with LoRA as the recipe says and write its run directory."""
    from . import launch, ownership
    from . import recipe as recipes
    from . import train as training
    from .memory import parse_size

    overrides = set_ or []
    capacity = parse_size(memory) if memory else None
    loaded = recipes.load(recipe, overrides)
    how = launch.Launch(
        num_processes,
        accelerate_config,
        num_machines,
        machine_rank,
        main_process_ip,
        main_process_port,
    )
    if how.relaunch_needed() and not dry_run:
        # Fail here, before spawning processes, on any bad input, a busy or finished run directory.
        # Only the main machine owns the run directory: the others hold no lock and read nothing there.
        if machine_rank == 0:
            ownership.check_free(loaded.output_dir)
        capacity = capacity or training.shared_memory(how)
        plan = training.make_plan(loaded, capacity, resume)
        if not (force or training.finished_already(loaded, resume)):
            training.refuse_if_too_big(plan)
        if machine_rank == 0 and ownership.claim(loaded, resume) is ownership.State.COMPLETE:
            training.finished(loaded.output_dir)
            return
        passed = [
            *(["--memory", str(capacity)] if capacity else []),
            *(["--force"] if force else []),
        ]
        raise typer.Exit(launch.relaunch(recipe, overrides, how, resume, _debug, passed))
    if not training.is_main_process() and not _debug:
        launch.quiet_worker()
    training.run(loaded, dry_run=dry_run, resume=resume, capacity=capacity, force=force)
    training.leave_process_group()


DataSet = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key, e.g. --set data.max_length=1024 (repeatable)."
    ),
]
PreviewSamples = Annotated[
    int, typer.Option("--samples", "-n", min=0, help="How many samples to show.")
]


@app.command("data")
def data_preview(recipe: RecipeFile, set_: DataSet = None, samples: PreviewSamples = 3):
    """Show the training samples with trained tokens highlighted, and the data statistics."""
    from . import preview
    from . import recipe as recipes

    preview.run(recipes.load(recipe, set_ or []), samples)


MergeSources = Annotated[
    list[Path], typer.Argument(help="A run directory or PEFT adapter; several to combine them.")
]
MergeOutput = Annotated[
    Path, typer.Option("--output", "-o", help="Directory for the merged model.")
]
Force = Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")]
MergeDtype = Annotated[
    str,
    typer.Option(
        help="Weight dtype of the merged model: auto (the base checkpoint's), float32, bfloat16, float16."
    ),
]
MergeMethod = Annotated[
    str,
    typer.Option(
        help="stream: shard by shard in bounded memory; memory: merge_and_unload on the loaded model; "
        "auto: stream where the adapter allows."
    ),
]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Compare merged and adapter-on-base logits (loads the model; skip it for "
        "models larger than memory).",
    ),
]
MaxShardSize = Annotated[
    str | None, typer.Option(help="Largest output shard, e.g. 2GB (default: the base's sharding).")
]
Weights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Weight of each adapter when combining several: --weights 0.7 0.3 (or 0.7,0.3).",
    ),
]
Combination = Annotated[
    str,
    typer.Option(
        help="How PEFT combines several adapters: cat (exact weighted sum), linear, svd, ties, dare_ties, ..."
    ),
]
Density = Annotated[
    float | None, typer.Option(help="Fraction of weights kept by ties / dare combinations.")
]
AdapterOnly = Annotated[
    bool,
    typer.Option("--adapter-only", help="Write the combined adapter instead of a merged model."),
]


@app.command()
def merge(
    sources: MergeSources,
    output: MergeOutput,
    force: Force = False,
    dtype: MergeDtype = "auto",
    method: MergeMethod = "auto",
    verify: Verify = True,
    max_shard_size: MaxShardSize = None,
    weights: Weights = None,
    combination: Combination = "cat",
    density: Density = None,
    adapter_only: AdapterOnly = False,
    allow_pickle: AllowPickle = False,
):
    """Fold adapters into their base model, verify the logits are unchanged, and save it."""
    from . import merge as merging

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise UserError(
            f"--weights: cannot read {weights!r}",
            ["give one number per adapter: --weights 0.7 0.3"],
        ) from None
    merging.run(
        sources,
        output,
        force=force,
        dtype=dtype,
        allow_pickle=allow_pickle,
        method=method,
        verify=verify,
        max_shard_size=max_shard_size,
        weights=parsed,
        combination=combination,
        density=density,
        adapter_only=adapter_only,
    )


ExportTarget = Annotated[
    Path, typer.Argument(help="A run directory, PEFT adapter or model directory (merged model).")
]
ExportOutput = Annotated[
    Path, typer.Option("--output", "-o", help="Directory for the GGUF, Modelfile and report.")
]
ExportFormat = Annotated[str, typer.Option("--format", help="Output format: gguf.")]
Quant = Annotated[
    str,
    typer.Option(
        help="GGUF type: f32, f16, bf16, q8_0 (llama.cpp's converter), or q4_k_m, q5_k_m, q6_k, "
        "q4_0, ... (llama.cpp's quantizer)."
    ),
]
ExportAdapterOnly = Annotated[
    bool,
    typer.Option(
        "--adapter-only", help="Write the adapter as a GGUF LoRA file for a base GGUF instead."
    ),
]
BaseGguf = Annotated[
    Path | None,
    typer.Option(
        help="With --adapter-only: the base model's GGUF to verify on and name in the Modelfile "
        "(default: convert the base too)."
    ),
]
ExportVerify = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Compare the GGUF in llama.cpp with the transformers model (loads it in float32).",
    ),
]
AllowTokenDifferences = Annotated[
    bool,
    typer.Option(
        "--allow-token-differences",
        help="Accept llama.cpp tokenizing probe texts differently from transformers.",
    ),
]


@app.command()
def export(
    target: ExportTarget,
    output: ExportOutput,
    format_: ExportFormat = "gguf",
    quant: Quant = "f16",
    adapter_only: ExportAdapterOnly = False,
    base_gguf: BaseGguf = None,
    force: Force = False,
    verify: ExportVerify = True,
    allow_token_differences: AllowTokenDifferences = False,
    allow_pickle: AllowPickle = False,
):
    """Convert to GGUF for llama.cpp and Ollama with llama.cpp's tools, verify it in llama.cpp
    against the transformers model, and write a Modelfile."""
    from . import export as exporting

    exporting.run(
        target,
        output,
        format_=format_,
        quant=quant,
        adapter_only=adapter_only,
        base_gguf=base_gguf,
        force=force,
        verify=verify,
        allow_pickle=allow_pickle,
        allow_token_differences=allow_token_differences,
    )


EvalTargets = Annotated[
    list[str],
    typer.Argument(
        help="Run directories, adapters, model directories or hub ids; several are compared side by side."
    ),
]
EvalData = Annotated[
    str | None,
    typer.Option(
        help="Evaluation data (a local file or hub dataset); default: the run recipe's eval data."
    ),
]
Compare = Annotated[
    bool, typer.Option("--compare", help="Evaluate base, adapter and merged model side by side.")
]
EvalMerged = Annotated[
    bool,
    typer.Option(
        "--merge/--no-merge", help="Evaluate an adapter merged (default) or unmerged on its base."
    ),
]
ShownSamples = Annotated[
    int,
    typer.Option(
        "--samples",
        min=0,
        help="Show this many prompts with base and fine-tuned generations side by side.",
    ),
]
Generation = Annotated[
    bool | None,
    typer.Option(
        "--generate/--no-generate",
        help="Greedy-generation metrics (exact match, token F1); default: on for data "
        "with prompts.",
    ),
]
MaxNewTokens = Annotated[
    int | None,
    typer.Option(
        min=1, help="Generation length limit; default: the longest reference answer plus 8."
    ),
]
Stop = Annotated[
    list[str] | None, typer.Option(help="Cut generations at this string (repeatable).")
]
Tasks = Annotated[
    str | None,
    typer.Option(
        help="lm-evaluation-harness tasks, e.g. arc_easy,hellaswag (pip install 'lora-tune[eval]')."
    ),
]
TasksPath = Annotated[
    Path | None, typer.Option(help="A folder of your own lm-eval task YAML files.")
]
Limit = Annotated[int | None, typer.Option(min=1, help="Examples per lm-eval task (default: all).")]
JsonFile = Annotated[
    Path | None, typer.Option("--json", help="Also write the report to this JSON file.")
]
Plot = Annotated[
    Path | None, typer.Option(help="Draw the run's training (and eval) loss to this PNG.")
]
Sampled = Annotated[
    int,
    typer.Option(
        "--sampled",
        min=0,
        help="On prompt-only data: also the mean reward of this many completions per prompt, "
        "sampled at the grpo run's temperature.",
    ),
]
BatchSize = Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")]
MaxSamples = Annotated[int | None, typer.Option(min=1, help="Evaluate on at most this many rows.")]


@app.command("eval")
def evaluate(
    targets: EvalTargets,
    data: EvalData = None,
    compare: Compare = False,
    merge: EvalMerged = True,
    samples: ShownSamples = 0,
    generation: Generation = None,
    max_new_tokens: MaxNewTokens = None,
    stop: Stop = None,
    tasks: Tasks = None,
    tasks_path: TasksPath = None,
    limit: Limit = None,
    json_file: JsonFile = None,
    plot: Plot = None,
    sampled: Sampled = 0,
    batch_size: BatchSize = 8,
    max_samples: MaxSamples = None,
    allow_pickle: AllowPickle = False,
):
    """Measure loss, perplexity, token accuracy and answers on held-out data (rewards on
    prompt-only data), and benchmarks."""
    from . import evaluate as evaluation

    evaluation.run(
        targets,
        data_spec=data,
        compare=compare,
        merge=merge,
        json_file=json_file,
        batch_size=batch_size,
        max_samples=max_samples,
        allow_pickle=allow_pickle,
        generation=generation,
        max_new_tokens=max_new_tokens,
        stop=stop or [],
        samples=samples,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        limit=limit,
        tasks_path=tasks_path,
        plot=plot,
        sampled=sampled,
    )


ServeTarget = Annotated[
    str,
    typer.Argument(help="A run or adapter directory (served with its base), or a base model."),
]
ServeAdapters = Annotated[
    list[str] | None,
    typer.Option("--adapter", help="Also serve this adapter as NAME=PATH (repeatable)."),
]
Host = Annotated[str, typer.Option(help="Address to listen on.")]
Port = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]
Engine = Annotated[
    str,
    typer.Option(
        help="local: lora-tune's own server (PEFT, one request at a time); vllm: vLLM's OpenAI server with the "
        "same adapters (needs vLLM and a CUDA GPU)."
    ),
]
BaseName = Annotated[
    str | None,
    typer.Option(
        help="The model name that serves the base without adapters (default: its id or path)."
    ),
]
ServeDtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar="LORA_TUNE_API_KEY",
        show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every route but /health (OpenAI clients: api_key=KEY). "
        "Prefer the environment variable: a command line is visible to other users.",
    ),
]
AllowRuntimeLora = Annotated[
    bool,
    typer.Option(
        "--allow-runtime-lora",
        help="Let clients load and unload adapters (/v1/load_lora_adapter, "
        "/v1/unload_lora_adapter), from under --adapter-root only.",
    ),
]
AdapterRoot = Annotated[
    Path | None,
    typer.Option(
        help="The folder runtime-loaded adapters must lie in (links followed); needs --allow-runtime-lora."
    ),
]
MaxBodyBytes = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Refuse (413) a request body over this many bytes (default: 4 MiB; local engine).",
    ),
]


@app.command()
def serve(
    target: ServeTarget,
    adapter: ServeAdapters = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    engine: Engine = "local",
    base_name: BaseName = None,
    dtype: ServeDtype = "auto",
    api_key: ApiKey = None,
    allow_runtime_lora: AllowRuntimeLora = False,
    adapter_root: AdapterRoot = None,
    max_body_bytes: MaxBodyBytes = None,
):
    """Serve the base model and adapters behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
    from . import serve as serving

    if engine not in ("local", "vllm"):
        raise UserError(f"--engine: expected local or vllm, got {engine!r}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}")
    serving.run(
        target,
        adapter or [],
        host,
        port,
        engine,
        base_name,
        dtype,
        api_key=api_key,
        allow_runtime_lora=allow_runtime_lora,
        adapter_root=adapter_root,
        max_body_bytes=max_body_bytes,
    )


ModelId = Annotated[str, typer.Argument(help="A hub id or local model directory.")]
Rank = Annotated[
    int,
    typer.Option(
        "--r", "-r", min=1, help="LoRA rank for the parameter counts and memory estimate."
    ),
]
Revision = Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Allow the model repository's own Python code to run."
    ),
]


@app.command()
def modules(
    model: ModelId,
    r: Rank = 16,
    revision: Revision = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """List the layers LoRA can target, the trainable parameters of attention-only and all-linear,
    and the estimated GPU memory of a training step (bf16 with and without gradient checkpointing,
    QLoRA 4-bit)."""
    from . import targets
    from .recipe import ModelSection

    targets.run(ModelSection(id=model, revision=revision, trust_remote_code=trust_remote_code), r)


def join_weights(argv: list[str]) -> list[str]:
    """`--weights 0.7 0.3` -> `--weights 0.7,0.3`: click cannot give an option several values
    after a variadic argument, and this is how users write it."""
    result, i = [], 0
    while i < len(argv):
        if argv[i] != "--weights":
            result.append(argv[i])
            i += 1
            continue
        j = i + 1
        while j < len(argv) and re.fullmatch(
            r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,.+)?", argv[j]
        ):
            j += 1
        result += ["--weights", ",".join(argv[i + 1 : j])]
        i = j
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors exit 2 with their message; bugs keep their traceback (exit 1)."""
    # Deprecation notices between transformers, peft and trl are theirs to fix, not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # PEFT imports bitsandbytes whenever it is installed, and bitsandbytes loads (and announces)
    # its kernels on import. Only a quantized base needs it: models.use_bitsandbytes lifts this.
    hidden = "bitsandbytes" not in sys.modules
    if hidden:
        sys.modules["bitsandbytes"] = None
    try:
        app(args=join_weights(sys.argv[1:] if argv is None else argv), prog_name="lora-tune")
    except UserError as exc:
        if _debug:
            raise
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True, soft_wrap=True).print(
            Text.assemble(("error: ", "bold red"), exc.render())
        )
        sys.exit(2)
    except KeyboardInterrupt:
        if _debug:
            raise
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    finally:
        if hidden and "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]  # for whoever calls main() in-process next


if __name__ == "__main__":
    main()
