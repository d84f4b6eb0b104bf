"""`lora-tune serve --engine vllm`: the same base and adapters handed to vLLM's own OpenAI server.

Builds the `vllm serve` command after checking each adapter against what vLLM's LoRA support
loads, and the environment vLLM runs in (the API key, runtime adapter loading off), then
replaces this process with vLLM.
"""

from __future__ import annotations

from pathlib import Path

from . import lora_methods, output, runs
from .errors import UserError
from .guard import Access, warn_if_exposed

console = output.console()


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def vllm_command(base, named: dict[str, Path], host: str, port: int, base_name: str) -> list[str]:
    """`vllm serve` with LoRA enabled and every adapter registered, after checking each against
    what vLLM's LoRA support loads (plain LoRA matrices, rank at most 512). Raises UserError."""
    problems, ranks = [], []
    for name, adapter in named.items():
        config = runs.adapter_config(adapter)
        unsupported = [feature.label for feature in lora_methods.unhandled(config, "vllm")]
        if not lora_methods.handles_type(config, "vllm"):
            unsupported.insert(0, f"{config.get('peft_type')} adapters")
        if unsupported:
            problems.append(
                f"{name} ({adapter}) uses {', '.join(unsupported)}, which vLLM does not serve as LoRA"
            )
        ranks.append(max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()]))
    rank = next((r for r in VLLM_RANKS if r >= max(ranks, default=1)), None)
    if rank is None:
        problems.append(
            f"rank {max(ranks)} is above vLLM's largest --max-lora-rank, {VLLM_RANKS[-1]}"
        )
    if problems:
        raise UserError(
            "--engine vllm: " + "; ".join(problems),
            [
                "merge such an adapter (lora-tune merge) and serve the merged model, or use --engine local"
            ],
        )
    command = [
        "vllm",
        "serve",
        base.id,
        "--served-model-name",
        base_name,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if base.revision:
        command += ["--revision", base.revision]
    if named:
        command += [
            "--enable-lora",
            "--max-lora-rank",
            str(rank),
            "--max-loras",
            str(len(named)),
            "--lora-modules",
            *(f"{name}={adapter.resolve()}" for name, adapter in named.items()),
        ]
    return command


def run_vllm(
    base,
    named: dict[str, Path],
    host: str,
    port: int,
    base_name: str,
    access: Access,
    explicit_limit: bool = False,
) -> None:
    """Replace this process with vLLM's OpenAI server, adapters registered."""
    import importlib.util
    import os

    import torch

    if access.runtime_adapter_root is not None:
        raise UserError(
            "--engine vllm: vLLM cannot keep runtime adapter loading to --adapter-root",
            [
                "use --engine local, or drop --allow-runtime-lora",
                "adapters given with --adapter are served either way",
            ],
        )
    if explicit_limit:
        raise UserError(
            "--engine vllm: --max-body-bytes applies to the local engine only",
            ["drop --max-body-bytes, or limit request sizes in a proxy in front of vLLM"],
        )
    command = vllm_command(base, named, host, port, base_name)
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "--engine vllm: vLLM is not installed",
            [("pip install vllm (Linux with a CUDA GPU), or use --engine local")],
        )
    if not torch.cuda.is_available():
        raise UserError(
            "--engine vllm: vLLM's LoRA serving needs a CUDA GPU, and this machine has none",
            ["use --engine local"],
        )
    warn_if_exposed(host, port, access.api_key or os.environ.get("VLLM_API_KEY"))
    console.print("Starting: " + " ".join(command))
    os.execvpe(command[0], command, vllm_environment(dict(os.environ), access.api_key))


def vllm_environment(environ: dict[str, str], api_key: str | None) -> dict[str, str]:
    """The environment for vLLM: the key in VLLM_API_KEY, which vLLM reads like its --api-key but
    which, unlike an argument, no process listing shows; runtime adapter loading off."""
    environ = {
        name: value for name, value in environ.items() if name != "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
    }
    if api_key:
        environ["VLLM_API_KEY"] = api_key
    return environ
