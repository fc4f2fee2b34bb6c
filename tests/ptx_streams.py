"""Which kernel argument each global load of a compiled kernel reads, from its PTX alone.

For each ``ld.global`` it finds the kernel pointer the address comes from (a backward walk over
register definitions, stopping at other loads, whose results are data) and reports the load
widths per stream (``crow`` / ``col`` / ``val`` / ``x`` for the CSR kernel), which of them sit
in the main loop, and whether the loop is software-pipelined for a stream (its loads used only
in the next iteration). tests/test_kernel_compile.py asserts on these for the CSR kernel; the
PTX comes from kernels/compiled.py (a job with ``"keep_ptx": True``).
"""

from __future__ import annotations

import re

_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[\w:]+)*")
_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+)_param_(\d+)\]")
_REG = re.compile(r"%[a-z]+\d+")
_NO_DEF = ("st.", "bra", "bar.", "ret", "membar", "fence", "@", "//", "}", "{", ".", "$")


def _instructions(ptx: str) -> list[str]:
    """PTX instructions one per entry, predicates stripped, comments and labels dropped
    (inline asm blocks are PTX too and are read the same way)."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        for part in line.split(";"):
            part = part.strip().lstrip("{}").strip()
            if part.startswith("@"):
                part = part.split(None, 1)[1] if " " in part else ""
            if part and not part.startswith(".") and not part.endswith(":"):
                out.append(part)
    return out


def _width(op: str) -> str:
    """``ld.global.L1::evict_last.v4.b32`` -> ``v4.b32`` (vector count and element width)."""
    parts = [p for p in op.split(".")[2:] if re.fullmatch(r"v\d|[bsuf]\d+", p)]
    return ".".join(parts) if parts[0].startswith("v") else "v1." + parts[0]


def _bytes(width: str) -> int:
    vec, elem = width.split(".")
    return int(vec[1:]) * int(elem[1:]) // 8


def _defs(insts: list[str]) -> dict[str, list[int]]:
    """Register -> indices of the instructions that write it."""
    defs: dict[str, list[int]] = {}
    for k, inst in enumerate(insts):
        if inst.startswith(_NO_DEF):
            continue
        ops = inst.split(None, 1)
        if len(ops) < 2:
            continue
        head = ops[1].split("}")[0] if ops[1].startswith("{") else ops[1].split(",")[0]
        for reg in _REG.findall(head):
            defs.setdefault(reg, []).append(k)
    return defs


def _shared_sources(insts: list[str], k: int) -> list[str]:
    """Registers a layout conversion stored before the ``ld.shared`` at ``k`` read back: the
    ``st.shared`` values between the two barriers above it."""
    bars = [j for j in range(k - 1, -1, -1) if insts[j].startswith("bar.")]
    if not bars:
        return []
    hi = bars[0]
    lo = bars[1] if len(bars) > 1 else -1
    regs = []
    for j in range(lo + 1, hi):
        if insts[j].startswith("st.shared"):
            regs += _REG.findall(insts[j].split("]", 1)[1])
    return regs


def _origins(reg: str, insts: list[str], defs: dict[str, list[int]],
             params: dict[str, int]) -> set[int]:
    """Kernel parameters an address register is computed from (not through other loads;
    through shared memory when a layout conversion moved the pointers)."""
    seen, todo, found = set(), [reg], set()
    while todo:
        r = todo.pop()
        if r in seen:
            continue
        seen.add(r)
        if r in params:
            found.add(params[r])
        for k in defs.get(r, ()):
            inst = insts[k]
            if _LD_GLOBAL.match(inst):
                continue  # a loaded value is data (an index), not where this pointer starts
            if inst.startswith(("ld.shared", "ldmatrix")):
                todo += _shared_sources(insts, k)
                continue
            body = inst.split(None, 1)[1]
            srcs = body.split("}", 1)[1] if body.startswith("{") else body.split(",", 1)[-1]
            todo += _REG.findall(srcs)
    return found


def stream_loads(ptx: str, names: list[str]) -> list[tuple[str, str]]:
    """(stream, width) for every ``ld.global`` in program order; ``names`` are the kernel's
    runtime (non-constexpr) arguments in order, ``*_ptr`` ones name the streams."""
    insts = _instructions(ptx)
    params = {}
    for inst in insts:
        m = _PARAM.match(inst)
        if m:
            params[m.group(1)] = int(m.group(3))
    defs = _defs(insts)
    out = []
    for inst in insts:
        m = _LD_GLOBAL.match(inst)
        if not m:
            continue
        addr = re.search(r"\[\s*(%\w+)", inst).group(1)
        ptrs = {names[i].removesuffix("_ptr") for i in _origins(addr, insts, defs, params)
                if i < len(names) and names[i].endswith("_ptr")}
        out.append(("+".join(sorted(ptrs)) or "?", _width(m.group(0))))
    return out


def _loops(ptx: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The PTX's lines (comments dropped) and its loops as (label line, branch-back line)."""
    lines = [ln.split("//")[0].strip() for ln in ptx.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.fullmatch(r"\$L\w+:", ln)}
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+)", ln)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    return lines, loops


def loop_loads(ptx: str, names: list[str]) -> list[list[tuple[str, str]]]:
    """The stream loads inside each loop (a label up to the last branch back to it), in order."""
    lines, loops = _loops(ptx)
    loops = [(s, e) for s, e in loops if not any(s2 == s and e2 > e for s2, e2 in loops)]
    everything = stream_loads(ptx, names)
    # Map loads back to lines: the n-th ld.global line is the n-th entry of `everything`.
    load_lines = [i for i, ln in enumerate(lines) if _LD_GLOBAL.search(ln)]
    return [[everything[k] for k, i in enumerate(load_lines) if s < i < e] for s, e in loops]


def loop_carried(ptx: str, names: list[str]) -> dict[str, bool]:
    """Per stream loaded in the main loop: True when the values a load brings in are not used
    later in the same iteration except by ``mov`` (the copies that carry them to the next one),
    i.e. the loop is software-pipelined for that stream: its latency overlaps the rest of the
    iteration. False when an iteration waits for its own load (a gather address, an FMA)."""
    lines, loops = _loops(ptx)
    if not loops:
        return {}
    s, e = max(loops, key=lambda se: se[1] - se[0])
    everything = stream_loads(ptx, names)
    load_lines = [i for i, ln in enumerate(lines) if _LD_GLOBAL.search(ln)]
    result: dict[str, bool] = {}
    for k, i in enumerate(load_lines):
        if not s < i < e:
            continue
        stream = everything[k][0]
        dest = lines[i].split("}")[0] if "{" in lines[i] else lines[i].split(",")[0]
        todo = [(reg, i) for reg in _REG.findall(dest.split("ld.global", 1)[1])]
        ok, seen = True, set()
        while todo and ok:  # follow the value through movs (copies, packing) to a real use
            reg, at = todo.pop()
            if (reg, at) in seen:
                continue
            seen.add((reg, at))
            for j in range(at + 1, e + 1):
                inst = re.sub(r"^@!?%p\d+\s+", "", lines[j])
                parts = inst.split(None, 1)
                if len(parts) < 2:
                    continue
                op, rest = parts
                if op.startswith(("st.", "bar", "bra")):
                    dests, srcs = "", rest
                elif rest.startswith("{"):
                    dests, srcs = rest.split("}", 1)
                else:
                    dests, _, srcs = rest.partition(",")
                if reg not in _REG.findall(srcs):
                    continue
                if op.startswith("mov."):
                    todo += [(d, j) for d in _REG.findall(dests)]
                else:
                    ok = False  # used in the iteration that loaded it
                    break
        result[stream] = result.get(stream, True) and ok
    return result
