"""Summarizes tools/kernel_regs.sh's dumps: python kernel_regs_summary.py PTXAS_LOG SASS_DUMP.

One block per kernel (entry function) of the object: `persistent_kernel` (XLA's launch) and
`persistent_group_kernel` (the single-GPU group harness), each with its own registers, stack
frame, spills and static shared memory (ptxas) and its own SASS section (cuobjdump lists one
section per kernel, with the device functions it calls). Then the device functions ptxas kept out
of line (the GEMV variants, the 64-bit unravel), which both kernels share.
"""

import re
import sys

ENTRY = re.compile(r"Compiling entry function '(\S+)'")
FRAME = re.compile(
    r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, "
    r"(\d+) bytes spill stores, (\d+) bytes spill loads"
)
USED = re.compile(r"Used (\d+) registers.*?(\d+) bytes smem")
SASS_FUNCTION = re.compile(r"^\s+Function : (\S+)", re.M)
SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", re.M)
KERNELS = ("persistent_kernel", "persistent_group_kernel")


def opcode(instruction: str) -> str:
    """The mnemonic of one SASS instruction, without its predicate (@P0, @!UP1 ...)."""
    words = re.sub(r"^@!?U?P\w+\s+", "", instruction).split()
    return words[0] if words else ""


def short_name(mangled: str) -> str:
    """The kernel's name in KERNELS that the mangled name spells, else the mangled name."""
    for name in KERNELS:
        if re.search(rf"\d{name}E", mangled):
            return name
    return mangled


def ptxas_entries(ptxas: str) -> dict[str, tuple[str, ...]]:
    """Per entry function: (registers, stack, spill stores, spill loads, static smem)."""
    entries = {}
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", ptxas):
        entry = ENTRY.search(block)
        frame = FRAME.search(block)
        used = USED.search(block)
        if entry and frame and used and frame.group(1) == entry.group(1):
            name = short_name(entry.group(1))
            entries[name] = (used.group(1), *frame.groups()[1:], used.group(2))
    return entries


def sass_sections(sass: str) -> dict[str, list[str]]:
    """Per kernel: the opcodes of its SASS section."""
    starts = list(SASS_FUNCTION.finditer(sass))
    sections = {}
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(sass)
        lines = SASS_LINE.findall(sass, m.end(), end)
        sections[short_name(m.group(1))] = [opcode(x) for x in lines]
    return sections


def main(ptxas_log: str, sass_dump: str) -> None:
    ptxas, sass = open(ptxas_log).read(), open(sass_dump).read()
    entries = ptxas_entries(ptxas)
    sections = sass_sections(sass)
    for name in KERNELS:
        if name not in entries:
            continue
        regs, stack, stores, loads, smem = entries[name]
        ops = sections.get(name, [])
        counts = {p: sum(o.startswith(p) for o in ops) for p in ("LDL", "STL", "CALL")}
        print(
            f"  {name}: {regs} registers, {stack} B stack frame, {stores} B spill stores, "
            f"{loads} B spill loads, {smem} B static smem; SASS {len(ops)} instructions, "
            f"{counts['LDL']} LDL, {counts['STL']} STL, {counts['CALL']} CALL"
        )
    entry_names = {m.group(1) for m in ENTRY.finditer(ptxas)}
    called = [f for f in FRAME.findall(ptxas) if f[0] not in entry_names]
    print(
        f"  {len(called)} called device functions: {sum(int(f[2]) for f in called)} B spill "
        f"stores, {sum(int(f[3]) for f in called)} B spill loads in all"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
