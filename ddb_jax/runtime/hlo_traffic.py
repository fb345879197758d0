"""Where a compiled program's memory traffic goes: its HLO's top-level ops, by pass and part.

XLA's ``cost_analysis()`` gives one "bytes accessed" figure: every operand and result of
every op, wherever it lives. On a TPU most of those live in on-chip memory: the compiler
stages arrays there (layouts marked ``S(1)``) with async copies and slices, so the figure
is not what the step moves through HBM. This reads the compiled HLO text instead: each op
the device runs (the entry computation's; a fusion is one op) reads its operands and
writes its result, and only arrays in main memory count. An async start's result holds its
operand and its destination, so its HBM bytes are its read or its write; an async slice
moves the slice. A fusion reading only a slice of an operand is charged the whole operand;
parameters, constants, tuples and bitcasts move nothing. Each op is attributed, from the
``op_name`` JAX records in its metadata (an async copy: that of what it reads), to a pass
(a network's forward, the backward ``transpose(jvp(...))``, the train state's or the
batch's staging, or the rest: losses, mixing, optimiser and EMA updates) and a part of the
network (convolutions, normalisation, ReLU, the decode head), and classed by what it
computes (a fusion holding a convolution, a dot, a reduction or only elementwise work;
copies, collectives).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")  # a layout's memory space other than HBM (0)
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Ops that move no data of their own.
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
        "partition-id", "replica-id", "iota"}  # fmt: skip
# A fusion's class: the first of these opcodes it holds, else 'elementwise'.
FUSION_KINDS = (
    ("convolution", "convolution"), ("dot", "dot"), ("reduce", "reduction"),
    ("reduce-window", "reduction"), ("scatter", "scatter/gather"), ("gather", "scatter/gather"),
)  # fmt: skip
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


@dataclasses.dataclass
class Op:
    name: str
    opcode: str
    result_bytes: int  # in HBM (an async slice: what it reads and writes there)
    operands: list[str]
    calls: str | None
    op_name: str


def _array_bytes(dtype: str, dims: str) -> int:
    size = _DTYPE_BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
    return size * math.prod(int(d) for d in dims.split(",") if d)


def shape_bytes(text: str, hbm_only: bool = True) -> int:
    """Bytes of every array shape in ``text`` (a tuple's elements summed); ``hbm_only``:
    those in device memory (HBM), arrays whose layout puts them in another memory space
    (TPU's on-chip ``S(1)``) counting zero."""
    return sum(
        _array_bytes(dtype, dims)
        for dtype, dims, layout in _SHAPE.findall(text)
        if not (hbm_only and _ON_CHIP.search(layout))
    )


def _slice_start_bytes(shape: str, hbm_only: bool = True) -> int:
    """An async slice ``((operand), slice, sync)``: the slice's bytes, read if the operand
    is in HBM and written if the slice is."""
    arrays = _SHAPE.findall(shape)
    if len(arrays) < 2:
        return shape_bytes(shape)
    (_, _, source), (dtype, dims, dest) = arrays[0], arrays[1]
    if not hbm_only:
        return 2 * _array_bytes(dtype, dims)
    moved = not _ON_CHIP.search(source), not _ON_CHIP.search(dest)
    return _array_bytes(dtype, dims) * sum(moved)


def _operand_span(rest: str) -> str:
    """The text of the operand list: up to the parenthesis that closes the opcode's."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i]
    return rest


def parse(text: str, hbm_only: bool = True) -> tuple[dict[str, list[Op]], str]:
    """The module's computations (name -> ops in order) and the entry computation's name;
    ``hbm_only=False``: an op's bytes in every memory space."""
    computations: dict[str, list[Op]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        if opcode == "slice-start":
            moved = _slice_start_bytes(shape, hbm_only)
        else:
            moved = shape_bytes(shape, hbm_only)
        calls, op_name = _CALLS.search(rest), _OP_NAME.search(rest)
        computations[current].append(
            Op(
                name,
                opcode,
                moved,
                _OPERAND.findall(_operand_span(rest)),
                calls.group(1) if calls else None,
                op_name.group(1) if op_name else "",
            )  # fmt: skip
        )
    return computations, entry


def kind_of(op: Op, computations: dict[str, list[Op]]) -> str:
    """What the op computes: a fusion by the ops inside it, else its opcode's class."""
    if op.opcode == "fusion" and op.calls in computations:
        inside = {o.opcode for o in computations[op.calls]}
        for opcode, kind in FUSION_KINDS:
            if opcode in inside:
                return kind
        return "elementwise"
    if op.opcode == "custom-call":
        return "convolution" if "conv" in op.op_name.rsplit("/", 1)[-1] else "custom-call"
    base = op.opcode.removesuffix("-start")
    if base in COLLECTIVES:
        return "collective"
    if op.opcode in ("copy", "copy-start", "transpose", "convolution", "dot"):
        return op.opcode.removesuffix("-start")
    return "other"


def pass_of(op_name: str) -> str:
    """'backward', 'forward' (a network's forward under autodiff), 'train state' (an
    argument's staging: parameters, moments), 'batch' or 'losses and updates'."""
    if op_name.startswith("state"):
        return "train state"
    if op_name.startswith("batch"):
        return "batch"
    if "transpose(jvp(" in op_name:
        return "backward"
    if "EncoderDecoder" in op_name or "/backbone/" in op_name or "/decode_head/" in op_name:
        return "forward"
    return "losses and updates"


_PART = re.compile(r"/(conv\w*|bn\w*|downsample\w*|jit\(relu\)|decode_head|gn\w*|ln\w*)(?=/|$)")


def part_of(op_name: str) -> str:
    """The network part from the op's name: 'conv', 'batchnorm', 'relu', 'decode head', 'other'."""
    parts = _PART.findall(op_name)
    if not parts:
        return "other"
    last = parts[-1]
    if last.startswith(("conv", "downsample")):
        return "conv"
    if last.startswith(("bn", "gn", "ln")):
        return "norm"
    if last == "jit(relu)":
        return "relu"
    return "decode head"


def traffic(text: str, top: int = 12, hbm_only: bool = True) -> dict[str, Any]:
    """The program's traffic per device: total, by pass and part, by kind, and the ``top``
    heaviest ops (name, kind, bytes, op_name); ``hbm_only=False``: every memory space's
    (close to XLA's bytes accessed, which counts on-chip operands too)."""
    computations, entry = parse(text, hbm_only)
    sizes: dict[str, int] = {}
    for ops in computations.values():
        for op in ops:
            sizes[op.name] = op.result_bytes
    by_pass: dict[str, int] = collections.Counter()
    by_kind: dict[str, int] = collections.Counter()
    count_kind: dict[str, int] = collections.Counter()
    rows = []
    ops = {op.name: op for op in computations.get(entry, [])}

    def origin(op: Op) -> str:
        """The op's name in JAX, or (an async copy, a slice) that of what it reads."""
        for _ in range(8):
            if op.op_name or not op.operands or op.operands[0] not in ops:
                break
            op = ops[op.operands[0]]
        return op.op_name

    for op in ops.values():
        if op.opcode in FREE or op.opcode.endswith("-done"):
            continue
        moved = op.result_bytes
        if not op.opcode.endswith("-start"):  # an async start's result holds its operand
            moved += sum(sizes.get(name, 0) for name in op.operands)
        kind, name = kind_of(op, computations), origin(op)
        by_pass[f"{pass_of(name)} / {part_of(name)}"] += moved
        by_kind[kind] += moved
        count_kind[kind] += 1
        rows.append((moved, op.name, kind, name))
    rows.sort(reverse=True)
    return {
        "total": sum(by_kind.values()),
        "by_pass_and_part": dict(by_pass.most_common()),
        "by_kind": {k: {"bytes": v, "ops": count_kind[k]} for k, v in by_kind.most_common()},
        "top": [dict(bytes=b, name=n, kind=k, op_name=o) for b, n, k, o in rows[:top]],
    }
