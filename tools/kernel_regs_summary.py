"""Summarizes tools/kernel_regs.sh's dumps: python kernel_regs_summary.py PTXAS_LOG SASS_DUMP."""

import re
import sys

FRAME = re.compile(
    r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, "
    r"(\d+) bytes spill stores, (\d+) bytes spill loads"
)
SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", re.M)


def opcode(instruction: str) -> str:
    """The mnemonic of one SASS instruction, without its predicate (@P0, @!UP1 ...)."""
    words = re.sub(r"^@!?U?P\w+\s+", "", instruction).split()
    return words[0] if words else ""


def main(ptxas_log: str, sass_dump: str) -> None:
    ptxas, sass = open(ptxas_log).read(), open(sass_dump).read()
    frames = FRAME.findall(ptxas)
    kernel = next(f for f in frames if f[0].endswith("persistent_kernelENS1_12KernelParamsE"))
    others = [f for f in frames if f is not kernel]
    used = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", ptxas)
    print(
        f"  persistent_kernel: {used.group(1)} registers, {kernel[1]} B stack frame, "
        f"{kernel[2]} B spill stores, {kernel[3]} B spill loads, {used.group(2)} B static smem"
    )
    print(
        f"  {len(others)} called device functions: {sum(int(f[2]) for f in others)} B spill "
        f"stores, {sum(int(f[3]) for f in others)} B spill loads in all"
    )
    ops = [opcode(i) for i in SASS_LINE.findall(sass)]
    counts = {p: sum(o.startswith(p) for o in ops) for p in ("LDL", "STL", "CALL")}
    print(
        f"  SASS: {len(ops)} instructions, {counts['LDL']} LDL, {counts['STL']} STL, "
        f"{counts['CALL']} CALL"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
