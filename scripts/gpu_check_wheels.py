"""The wheels scripts/gpu_check.sh carries to a GPU machine without a network: fit them in the
device tool's 64 MiB.

    python scripts/gpu_check_wheels.py slim WHEEL --keep cuda13   # drop the other CUDA builds
    python scripts/gpu_check_wheels.py size DIR --limit-mib 60    # total size, and fail past it

bitsandbytes' wheel holds its native library once per CUDA and ROCm release (43 MB); the machine
needs the one matching its torch's CUDA. `slim` rewrites the wheel in place without the others
(the CPU library stays) and drops their lines from its RECORD, so pip installs it as before.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

NATIVE = re.compile(r"libbitsandbytes_(cuda|rocm|xpu)[^/]*\.(so|dll|dylib)$")


def dropped(name: str, keep: str) -> bool:
    """Whether a file of the wheel is a native build for another CUDA/ROCm/XPU release."""
    found = NATIVE.search(name)
    return bool(found) and not Path(name).name.startswith(f"libbitsandbytes_{keep}")


def slim(wheel: Path, keep: str) -> list[str]:
    """Rewrite `wheel` without the native libraries `keep` does not name; returns those dropped."""
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        removed = [name for name in names if dropped(name, keep)]
        if not any(NATIVE.search(name) and name not in removed for name in names):
            sys.exit(f"{wheel.name}: no native library matches {keep!r}; nothing would load")
        staged = wheel.with_suffix(".slim")
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as target:
            for name in names:
                if name in removed:
                    continue
                data = source.read(name)
                if name.endswith(".dist-info/RECORD"):
                    data = record_without(data.decode(), removed).encode()
                target.writestr(source.getinfo(name), data)
    staged.replace(wheel)
    return removed


def record_without(record: str, removed: list[str]) -> str:
    gone = set(removed)
    lines = [line for line in record.splitlines() if line.split(",", 1)[0] not in gone]
    return "\n".join(lines) + "\n"


def total_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    slim_command = commands.add_parser("slim", help="drop the native builds --keep does not name")
    slim_command.add_argument("wheel", type=Path)
    slim_command.add_argument("--keep", required=True, help="e.g. cuda13 (cuda130, cuda132)")
    size_command = commands.add_parser("size", help="the wheels' total size")
    size_command.add_argument("folder", type=Path)
    size_command.add_argument("--limit-mib", type=float, default=60)
    args = parser.parse_args()
    if args.command == "slim":
        before = args.wheel.stat().st_size
        removed = slim(args.wheel, args.keep)
        print(
            f"{args.wheel.name}: {before / 2**20:.1f} -> {args.wheel.stat().st_size / 2**20:.1f} "
            f"MiB without {len(removed)} native builds"
        )
        return
    size = total_size(args.folder) / 2**20
    print(f"{args.folder}: {len(list(args.folder.glob('*.whl')))} wheels, {size:.1f} MiB")
    if size > args.limit_mib:
        sys.exit(f"over {args.limit_mib} MiB: the device tool carries at most 64 MiB with the tree")


if __name__ == "__main__":
    main()
