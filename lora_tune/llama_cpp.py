"""llama.cpp's own tools, as lora-tune uses them: its converters (convert_hf_to_gguf.py,
convert_lora_to_gguf.py, with their `conversion` and `gguf-py` packages) and, through
llama-cpp-python, its quantizer and runtime.

The converters are not in llama-cpp-python's wheel, only in its source distribution, whose
vendored llama.cpp is the one the installed library was built from. They are unpacked once per
version into ~/.cache/lora-tune (`python -m lora_tune.llama_cpp` does it ahead of time; scripts/
setup.sh runs it); LORA_TUNE_LLAMA_CPP may point at a llama.cpp checkout instead.

    python -m lora_tune.llama_cpp      # fetch the converters of the installed llama-cpp-python
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError

ENV = "LORA_TUNE_LLAMA_CPP"
DISTRIBUTION = "llama-cpp-python"
# What the converters need from llama.cpp's tree.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
INSTALL_HINT = "pip install 'lora-tune[export]' (builds llama-cpp-python from source: minutes)"
# Output types the converter writes itself, and llama.cpp's quantizer types (from f16).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANT_TYPES = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_runtime() -> str:
    """The installed llama-cpp-python's version; a UserError when it is missing."""
    version = installed_version()
    if version is None:
        raise UserError(
            "GGUF export needs llama.cpp (llama-cpp-python), which is not installed",
            [INSTALL_HINT, "or write a transformers model directory with `lora-tune merge`"],
        )
    return version


def cache_folder(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lora-tune" / f"llama.cpp-{version}"


def converter_root(fetch_missing: bool = True) -> Path:
    """The folder holding convert_hf_to_gguf.py and its packages."""
    if os.environ.get(ENV):
        root = Path(os.environ[ENV]).expanduser()
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise UserError(
                f"{ENV}={root}: no convert_hf_to_gguf.py there",
                [f"point {ENV} at a llama.cpp checkout, or unset it to use llama-cpp-python's"],
            )
        return root
    version = require_runtime()
    root = cache_folder(version)
    if not all((root / part).exists() for part in CONVERTER_PARTS):
        if not fetch_missing:
            raise UserError(f"llama.cpp's converters are not unpacked in {root}")
        fetch(version, root)
    return root


def fetch(version: str, root: Path) -> Path:
    """Download llama-cpp-python's source distribution (pip's cache serves a repeat) and unpack
    the converters into `root`, atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--no-binary", ":all:", "-d", tmp, f"{DISTRIBUTION}=={version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise UserError(
                f"could not download {DISTRIBUTION} {version}'s source distribution, which holds "
                f"llama.cpp's converters: {last_lines(done.stderr, 3)}",
                [
                    "run `python -m lora_tune.llama_cpp` once where PyPI can be reached",
                    f"or set {ENV} to a llama.cpp checkout",
                ],
            )
        unpack(archives[0], root)
    return root


def unpack(archive: Path, root: Path) -> None:
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        prefix = next(
            m.name.removesuffix("convert_hf_to_gguf.py")
            for m in tar.getmembers()
            if m.name.endswith("vendor/llama.cpp/convert_hf_to_gguf.py")
        )
        wanted = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix)
            and m.name[len(prefix) :].split("/")[0] in CONVERTER_PARTS
            and (m.isfile() or m.isdir())
        ]
        for member in wanted:
            member.name = member.name[len(prefix) :]
        tar.extractall(staging, members=wanted, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)


def last_lines(text: str, n: int) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "no message"


def supported_architectures(root: Path) -> list[str]:
    """The transformers architectures (config.json `architectures`) the converter handles:
    the keys of its TEXT_MODEL_MAP, read without importing it; older trees register them with
    @ModelBase.register(...) in convert_hf_to_gguf.py."""
    package = root / "conversion" / "__init__.py"
    if package.is_file():
        for node in ast.walk(ast.parse(package.read_text())):
            if isinstance(node, ast.AnnAssign | ast.Assign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(t, "id", None) == "TEXT_MODEL_MAP" for t in targets):
                    return sorted(ast.literal_eval(node.value))
    script = (root / "convert_hf_to_gguf.py").read_text()
    names = re.findall(r"@ModelBase\.register\(([^)]*)\)", script)
    return sorted({n for group in names for n in re.findall(r"\"(\w+)\"", group)})


def run_converter(script: str, arguments: list[str], root: Path) -> str:
    """Run one of llama.cpp's converters with this Python; its output, or a UserError with the
    converter's last lines when it fails."""
    command = [sys.executable, str(root / script), *arguments]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        raise UserError(
            f"llama.cpp's {script} failed: {last_lines(output, 4)}", converter_advice(output)
        )
    return done.stdout + done.stderr


def converter_advice(output: str) -> list[str]:
    if "pre-tokenizer was not recognized" in output:
        return [
            "llama.cpp identifies BPE tokenizers by a hash of known ones, and this tokenizer is not "
            "among them: export a model whose tokenizer llama.cpp supports (or a SentencePiece "
            "tokenizer.model)",
            "the merged transformers directory (`lora-tune merge`) still works with transformers",
        ]
    if "sentencepiece" in output:
        return ["pip install sentencepiece (part of lora-tune[export])"]
    return ["run the converter by hand with --verbose to see more, or report the model"]


@contextlib.contextmanager
def native_output(sink: list[str]):
    """Capture llama.cpp's logging into `sink`: what native code writes to file descriptors 1
    and 2, and what llama-cpp-python's log callback prints to sys.stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as capture:
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            with contextlib.redirect_stdout(capture), contextlib.redirect_stderr(capture):
                yield
        finally:
            capture.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            capture.seek(0)
            sink.append(capture.read())


def quantize(source: Path, target: Path, kind: str, threads: int) -> dict:
    """llama.cpp's quantizer (llama_model_quantize) from an f16/f32 GGUF to `kind`; how many
    tensors it had to give another type (k-quants need rows of 256)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[kind])
    params.nthread = threads
    log: list[str] = []
    with native_output(log):
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), llama_cpp.byref(params)
        )
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log[0])
    if status != 0:
        raise UserError(
            f"llama.cpp's quantizer failed on {source.name} -> {kind} (status {status})",
            ["export f16 or q8_0 instead, which the converter writes itself"],
        )
    if fallback is None:
        return {}
    return {"fallback_tensors": int(fallback[1]), "tensors": int(fallback[2])}


def main() -> None:
    root = converter_root()
    print(f"llama.cpp converters in {root} ({len(supported_architectures(root))} architectures)")


if __name__ == "__main__":
    main()
