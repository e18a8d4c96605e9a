"""Summary of tools/kernel_regs.sh's ptxas -v and SASS dumps: python kernel_regs_summary.py PTXAS SASS"""

import re, sys
ptxas, sass = (open(f).read() for f in sys.argv[1:3])
frames = re.findall(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
kernel = [f for f in frames if f[0].endswith("persistent_kernelENS1_12KernelParamsE")][0]
others = [f for f in frames if f is not kernel]
used = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", ptxas)
print(f"  persistent_kernel: {used.group(1)} registers, {kernel[1]} B stack frame, {kernel[2]} B spill "
      f"stores, {kernel[3]} B spill loads, {used.group(2)} B static smem")
print(f"  {len(others)} called device functions: {sum(int(f[2]) for f in others)} B spill stores, "
      f"{sum(int(f[3]) for f in others)} B spill loads in all, largest frame {max([int(f[1]) for f in others] or [0])} B")
ins = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", sass, re.M)
op = lambda i: re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] if i.strip() else ""
ops = [op(i) for i in ins]
count = lambda p: sum(o.startswith(p) for o in ops)
print(f"  SASS: {len(ops)} instructions, {count('LDL')} LDL, {count('STL')} STL, {count('CALL')} CALL")
