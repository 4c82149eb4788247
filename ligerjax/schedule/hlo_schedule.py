"""Read a compiled XLA schedule back: parse scheduled HLO text, price it, measure overlap.

``compiled.as_text()`` of a scheduled module (``is_scheduled=true``) lists the ENTRY
computation's instructions in the order they run: that order *is* the schedule. An async
collective appears as a start/done pair (``all-reduce-start`` ... ``all-reduce-done``,
``collective-permute-start/done``, ``all-gather-start/done``, or a generic
``async-start/done`` wrapping one); whatever compute XLA put between the two runs while the
collective is in flight. An async ``call-start/call-done`` (``compute_on("gpu_stream:1")``)
runs its called computation on another stream while the entry goes on.

:func:`parse_hlo` turns the text into plain dataclasses (:class:`HloModule`,
:class:`Computation`, :class:`Instr`, :class:`AsyncPair`); :func:`instr_cost` prices one
instruction with a :class:`~ligerjax.cost.CostModel` (GEMMs by ``2·M·N·K`` FLOPs found in the
instruction or its fused computation, other kernels by bytes in + out, collectives by the ring
formulas with ``n`` from ``replica_groups``); :func:`overlap_coverage` reports, per collective,
how much compute the schedule placed inside its window and the covered fraction of the
selected (primary) collectives' time.

Pricing rules, stated once:

* free (0 s): ``parameter``, ``constant``, ``bitcast``, ``get-tuple-element``, ``tuple``,
  ``after-all``, ``partition-id``, ``replica-id``, ``opt-barrier``, and every start/done marker;
* a GEMM (``dot``, a ``custom-call`` whose ``backend_config`` has ``dot_dimension_numbers``
  such as ``__cublas$gemm`` / ``__cublas$lt$matmul``, a fusion whose computation holds a
  ``dot``, e.g. a Triton GEMM fusion): ``op_duration(Σ 2·|out|·|contracted|, bytes, dtype)``
  with the dot operands' dtype;
* any other kernel (fusion, copy, ...): ``op_duration(0, bytes in + out)``;
* ``call`` / async call: the sum over its computation; ``while``: body × ``known_trip_count``
  (1 if unknown); ``conditional``: the longest branch;
* collectives: ``all_reduce`` / ``reduce_scatter`` on the operand bytes, ``all_gather`` on the
  gathered (result) bytes, ``permute`` on the first operand's bytes, ``all-to-all`` priced as
  an all-gather of its bytes (the same per-device traffic as a ring). ``n`` is the size of a
  replica group (``{{0,1,2,3}}`` or iota ``[2,4]<=[8]``); an empty list means all
  ``num_partitions`` (or ``replica_count``) devices.

Coverage: for an async collective with window (start, done) in the entry order, the compute
inside is the summed duration of the compute instructions strictly between them, plus the whole
duration of every async call whose (call-start, call-done) interval overlaps the window (it
runs concurrently on its stream). ``covered = min(duration, compute inside)``. A synchronous
collective (no pair, e.g. the CPU's ``all-reduce``, or a pair XLA marked ``"is_sync":true``)
has nothing inside. ``coverage = Σ covered / Σ duration`` over the selected collectives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from ligerjax.cost.cost_model import CostModel

log = logging.getLogger(__name__)

# HLO primitive type -> (bytes per element, cost-model dtype name)
_DTYPES: Mapping[str, tuple[float, str]] = MappingProxyType(
    {
        "pred": (1, "int8"),
        "s4": (0.5, "int8"),
        "u4": (0.5, "int8"),
        "s8": (1, "int8"),
        "u8": (1, "int8"),
        "s16": (2, "float16"),
        "u16": (2, "float16"),
        "f16": (2, "float16"),
        "bf16": (2, "bfloat16"),
        "s32": (4, "float32"),
        "u32": (4, "float32"),
        "f32": (4, "float32"),
        "s64": (8, "float64"),
        "u64": (8, "float64"),
        "f64": (8, "float64"),
        "c64": (8, "float32"),
        "c128": (16, "float64"),
        "f8e4m3fn": (1, "float8_e4m3fn"),
        "f8e5m2": (1, "float8_e4m3fn"),
        "token": (0, "float32"),
    }
)

FREE_OPCODES = frozenset(
    {
        "parameter",
        "constant",
        "bitcast",
        "get-tuple-element",
        "tuple",
        "after-all",
        "partition-id",
        "replica-id",
        "opt-barrier",
        "add-dependency",
        "domain",
        "async-update",
    }
)
# opcode (without -start/-done) -> CostModel collective
COLLECTIVE_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "all-reduce": "all_reduce",
        "all-gather": "all_gather",
        "reduce-scatter": "reduce_scatter",
        "collective-permute": "permute",
        "all-to-all": "all_to_all",
        "ragged-all-to-all": "all_to_all",
        "collective-broadcast": "all_gather",
    }
)
COMM_KINDS = frozenset(COLLECTIVE_KINDS.values())
ASYNC_SUFFIXES = ("-start", "-done")


# -- text scanning ---------------------------------------------------------------------------

_COMMENT = re.compile(r"/\*.*?\*/")
_OPEN, _CLOSE = "([{", ")]}"


def _unquoted(text: str, start: int = 0) -> Iterator[tuple[int, str, int]]:
    """``(index, char, bracket depth before it)`` of each character of ``text`` from
    ``start`` that is outside a quoted string (escapes respected)."""
    depth, i, quote = 0, start, False
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
        else:
            yield i, ch, depth
            depth += (ch in _OPEN) - (ch in _CLOSE)
        i += 1


def _matching(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]`` (quotes respected)."""
    for i, ch, depth in _unquoted(text, start):
        if ch in _CLOSE and depth == 1:
            return i + 1
    raise ValueError(f"unbalanced brackets in HLO text: {text[start : start + 80]!r}")


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` at ``sep`` outside brackets and quotes; parts are stripped, empty dropped."""
    parts, begin = [], 0
    for i, ch, depth in _unquoted(text):
        if ch == sep and depth == 0:
            parts.append(text[begin:i])
            begin = i + 1
    parts.append(text[begin:])
    return [p.strip() for p in parts if p.strip()]


# -- shapes ----------------------------------------------------------------------------------

_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,\s]*)\]")


@dataclass(frozen=True)
class Shape:
    """One array of an instruction's result: HLO dtype (``"bf16"``) and dimensions."""

    dtype: str
    dims: tuple[int, ...]

    @property
    def size(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def nbytes(self) -> float:
        return self.size * _DTYPES.get(self.dtype, (4, "float32"))[0]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def parse_shape(text: str) -> tuple[Shape, ...]:
    """The array leaves of an HLO shape (tuples flattened; layouts ``{1,0:T(8,128)}`` ignored)."""
    no_layouts = re.sub(r"\{[^{}]*\}", "", text)
    return tuple(
        Shape(dtype, tuple(int(d) for d in dims.replace(" ", "").split(",") if d))
        for dtype, dims in _ARRAY.findall(no_layouts)
    )


# -- instructions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instr:
    """One HLO instruction as the schedule reader needs it.

    ``shapes``: the result's array leaves; ``operands``: operand instruction names (no ``%``);
    ``op_name``: the ``metadata`` op_name (JAX's name stack, e.g.
    ``jit(step)/shard_map/primary/psum_invariant``), ``""`` when absent; ``scopes``: the
    op_names this instruction carries or, when it has none, inherits from its nearest tagged
    producers (a combined all-reduce of two batches inherits both); ``called``: the
    computations it calls (``calls=``, ``to_apply=``, ``body=``, ...); ``attrs``: every other
    attribute as raw text.
    """

    name: str
    opcode: str
    shapes: tuple[Shape, ...]
    operands: tuple[str, ...]
    index: int
    op_name: str = ""
    custom_call_target: str = ""
    called: tuple[str, ...] = ()
    attrs: Mapping[str, str] = field(default_factory=dict)
    is_root: bool = False
    scopes: tuple[str, ...] = ()

    @property
    def base_opcode(self) -> str:
        """The opcode without ``-start`` / ``-done``."""
        for suffix in ASYNC_SUFFIXES:
            if self.opcode.endswith(suffix):
                return self.opcode[: -len(suffix)]
        return self.opcode

    @property
    def is_start(self) -> bool:
        return self.opcode.endswith("-start")

    @property
    def is_done(self) -> bool:
        return self.opcode.endswith("-done")

    @property
    def is_collective(self) -> bool:
        """A collective op, synchronous or either half of an async one (not async-start)."""
        return self.base_opcode in COLLECTIVE_KINDS

    @property
    def dtype(self) -> str:
        return self.shapes[0].dtype if self.shapes else ""

    @property
    def nbytes(self) -> float:
        return sum(s.nbytes for s in self.shapes)

    @cached_property
    def backend_config(self) -> dict[str, Any]:
        """``backend_config`` as JSON (``{}`` when absent or not JSON)."""
        raw = self.attrs.get("backend_config", "")
        if not raw.startswith("{"):
            return {}
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def is_sync(self) -> bool:
        """Whether XLA marked this collective ``"is_sync":true`` (run on the compute stream)."""
        config = self.backend_config.get("collective_backend_config", {})
        return bool(isinstance(config, dict) and config.get("is_sync", False))

    @property
    def replica_groups(self) -> tuple[tuple[int, ...], ...] | None:
        """Explicit replica groups; ``None`` when given in iota form or absent."""
        raw = self.attrs.get("replica_groups", "")
        if not raw.startswith("{"):
            return None
        return tuple(
            tuple(int(x) for x in re.findall(r"-?\d+", group))
            for group in re.findall(r"\{([^{}]*)\}", raw[1:-1])
        )

    def group_size(self, default: int) -> int:
        """Devices in one replica group (``default`` when the groups say "all")."""
        raw = self.attrs.get("replica_groups", "")
        groups = self.replica_groups
        if groups:
            return max(1, len(groups[0]))
        iota = re.match(r"\[([\d,\s]+)\]<=", raw)
        if iota:
            return int(iota.group(1).split(",")[-1])
        return default


_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-_$]*)\(")
_CALL_ATTRS = (
    "calls",
    "to_apply",
    "body",
    "condition",
    "branch_computations",
    "true_computation",
    "false_computation",
    "async_execution_thread_computation",
)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n for n in re.findall(r"%([^\s,{}()]+)", text))


def parse_instr(line: str, index: int) -> Instr | None:
    """One instruction line (``None`` for a line that is not one)."""
    line = _COMMENT.sub("", line)
    m = _INSTR.match(line)
    if m is None:
        return None
    root, name, rest = m.group(1), m.group(2), m.group(3).strip()
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape_text, rest = rest[:end], rest[end:]
    else:
        shape_text, _, rest = rest.partition(" ")
        rest = " " + rest
    op = _OPCODE.match(rest)
    if op is None:
        return None
    opcode = op.group(1)
    open_at = op.end() - 1
    close_at = _matching(rest, open_at)
    operand_text = rest[open_at + 1 : close_at - 1]
    operands: tuple[str, ...] = ()
    if opcode != "constant":
        # "%name", or "name", or the long form "f32[2]{0} %name": the name is the last token
        operands = tuple(
            (_names(part) or (part.split()[-1],))[-1] for part in _split_top(operand_text)
        )
    attrs: dict[str, str] = {}
    for part in _split_top(rest[close_at:]):
        key, eq, value = part.partition("=")
        if eq:
            attrs[key.strip()] = value.strip()
    metadata = attrs.get("metadata", "")
    op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', metadata)
    target = attrs.get("custom_call_target", "").strip('"')
    called: list[str] = []
    for key in _CALL_ATTRS:
        if key in attrs:
            raw = attrs[key]
            called.extend(_names(raw) or [n.strip() for n in raw.strip("{}").split(",")])
    return Instr(
        name=name,
        opcode=opcode,
        shapes=parse_shape(shape_text),
        operands=operands,
        index=index,
        op_name=op_name.group(1) if op_name else "",
        custom_call_target=target,
        called=tuple(called),
        attrs=MappingProxyType(attrs),
        is_root=bool(root),
    )


# -- computations and the module -------------------------------------------------------------


@dataclass(frozen=True)
class Computation:
    """A named HLO computation; ``instrs`` in text order (the schedule, when scheduled)."""

    name: str
    instrs: tuple[Instr, ...]
    is_entry: bool = False

    @cached_property
    def by_name(self) -> Mapping[str, Instr]:
        return MappingProxyType({i.name: i for i in self.instrs})

    def __getitem__(self, name: str) -> Instr:
        return self.by_name[name]

    def operand_bytes(self, instr: Instr) -> float:
        return sum(self.by_name[o].nbytes for o in instr.operands if o in self.by_name)


@dataclass(frozen=True)
class AsyncPair:
    """An async start and its done in the entry schedule (positions are entry indices)."""

    start: str
    done: str
    start_index: int
    done_index: int
    kind: str  # a CostModel collective ("all_reduce", ...), "call" (async compute) or "copy"


@dataclass(frozen=True)
class HloModule:
    """A parsed HLO module: its computations, the entry, and the async pairs of the entry."""

    name: str
    computations: Mapping[str, Computation]
    entry: Computation
    num_partitions: int = 1
    replica_count: int = 1
    is_scheduled: bool = False

    @cached_property
    def pairs(self) -> tuple[AsyncPair, ...]:
        """Every start/done pair of the entry, in start order."""
        out = []
        for done in self.entry.instrs:
            if not done.is_done or not done.operands:
                continue
            start = self.entry.by_name.get(done.operands[0])
            if start is None or not start.is_start:
                continue
            out.append(AsyncPair(start.name, done.name, start.index, done.index, self.kind(start)))
        return tuple(sorted(out, key=lambda p: p.start_index))

    @cached_property
    def done_of(self) -> Mapping[str, AsyncPair]:
        """start name -> its pair."""
        return MappingProxyType({p.start: p for p in self.pairs})

    def kind(self, instr: Instr) -> str:
        """The collective kind of ``instr`` (``"all_reduce"``, ...), ``"call"`` for an async
        computation that holds no collective, ``""`` for anything else."""
        if instr.base_opcode in COLLECTIVE_KINDS:
            return COLLECTIVE_KINDS[instr.base_opcode]
        if instr.base_opcode == "copy" and (instr.is_start or instr.is_done):
            return "copy"
        if instr.base_opcode in ("async", "call"):
            for called in instr.called:
                comp = self.computations.get(called)
                for inner in comp.instrs if comp else ():
                    if inner.is_collective:
                        return COLLECTIVE_KINDS[inner.base_opcode]
            return "call"
        return ""

    def collective_target(self, instr: Instr) -> tuple[Instr, Computation]:
        """The instruction that names the collective's operands and groups: ``instr`` itself,
        or the collective inside an ``async-start``'s computation."""
        if instr.base_opcode == "async":
            for called in instr.called:
                comp = self.computations.get(called)
                if comp is None:
                    continue
                for inner in comp.instrs:
                    if inner.is_collective:
                        return inner, comp
        return instr, self.entry


_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*(\(.*)?\{\s*$")


def _iter_computations(text: str) -> Iterator[tuple[str, bool, list[str]]]:
    lines = iter(text.splitlines())
    for line in lines:
        if not line or line[0].isspace() or not line.rstrip().endswith("{"):
            continue
        if line.startswith("HloModule"):
            continue
        header = _HEADER.match(_COMMENT.sub("", line).rstrip())
        if header is None or ("->" not in line and header.group(3) is None):
            continue
        body = []
        for inner in lines:
            if inner.strip() == "}":
                break
            body.append(inner)
        yield header.group(2), bool(header.group(1)), body


def _with_scopes(comp: Computation) -> Computation:
    """Fill ``Instr.scopes``: own op_name, else the op_names of the nearest tagged producers."""
    scopes: dict[str, tuple[str, ...]] = {}
    instrs = []
    for instr in comp.instrs:  # producers precede users in HLO text
        if instr.op_name:
            own: tuple[str, ...] = (instr.op_name,)
        else:
            found: dict[str, None] = {}
            for operand in instr.operands:
                found.update(dict.fromkeys(scopes.get(operand, ())))
            own = tuple(found)
        scopes[instr.name] = own
        instrs.append(dataclasses.replace(instr, scopes=own))
    return Computation(comp.name, tuple(instrs), comp.is_entry)


def parse_hlo(text: str) -> HloModule:
    """Parse HLO text (``compiled.as_text()``, ``lowered.as_text(dialect="hlo")``)."""
    head = next((line for line in text.splitlines() if line.startswith("HloModule")), "")
    module_name = head.split()[1].rstrip(",") if len(head.split()) > 1 else ""
    computations: dict[str, Computation] = {}
    entry_name = None
    for name, is_entry, body in _iter_computations(text):
        instrs: list[Instr] = []
        for line in body:
            instr = parse_instr(line, len(instrs))
            if instr is not None:
                instrs.append(instr)
        computations[name] = _with_scopes(Computation(name, tuple(instrs), is_entry))
        if is_entry:
            entry_name = name
    if not computations:
        raise ValueError("no HLO computation found in the text")
    if entry_name is None:
        if len(computations) > 1:
            raise ValueError("the HLO text has several computations and no ENTRY")
        entry_name = next(iter(computations))

    def header_int(key: str) -> int:
        m = re.search(rf"\b{key}=(\d+)", head)
        return int(m.group(1)) if m else 1

    return HloModule(
        name=module_name,
        computations=MappingProxyType(computations),
        entry=computations[entry_name],
        num_partitions=header_int("num_partitions"),
        replica_count=header_int("replica_count"),
        is_scheduled="is_scheduled=true" in head,
    )


# -- pricing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstrCost:
    """What one instruction costs: ``kind`` is ``"free"``, ``"gemm"``, ``"compute"``,
    ``"comm"`` (a collective) or ``"marker"`` (the done of a pair, priced at its start)."""

    kind: str
    duration_s: float
    flops: float = 0.0
    bytes: float = 0.0
    dtype: str = ""

    @property
    def is_compute(self) -> bool:
        return self.kind in ("gemm", "compute") and self.duration_s > 0


def _dims(raw: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", raw))


def _dot_flops(out: tuple[Shape, ...], lhs: Shape | None, contracting: tuple[int, ...]) -> float:
    if not out or lhs is None:
        return 0.0
    k = 1
    for d in contracting:
        if d < len(lhs.dims):
            k *= lhs.dims[d]
    return 2.0 * out[0].size * k


def _gemm(module: HloModule, comp: Computation, instr: Instr) -> tuple[float, str] | None:
    """(FLOPs, operand dtype) of a GEMM instruction, ``None`` if it is not one."""
    if instr.opcode == "dot":
        lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
        contracting = _dims(instr.attrs.get("lhs_contracting_dims", ""))
        lhs_shape = lhs.shapes[0] if lhs and lhs.shapes else None
        dtype = lhs_shape.dtype if lhs_shape else instr.dtype
        return _dot_flops(instr.shapes, lhs_shape, contracting), dtype
    if instr.opcode == "custom-call":
        dims = instr.backend_config.get("gemm_backend_config", {}).get("dot_dimension_numbers")
        if dims is None:
            dims = instr.backend_config.get("dot_dimension_numbers")
        if not isinstance(dims, dict):
            return None
        lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
        lhs_shape = lhs.shapes[0] if lhs and lhs.shapes else None
        contracting = tuple(int(d) for d in dims.get("lhs_contracting_dimensions", []))
        dtype = lhs_shape.dtype if lhs_shape else instr.dtype
        return _dot_flops(instr.shapes[:1], lhs_shape, contracting), dtype
    if instr.opcode == "fusion":
        total, dtype, found = 0.0, "", False
        for called in instr.called:
            inner_comp = module.computations.get(called)
            for inner in inner_comp.instrs if inner_comp else ():
                if inner.opcode in ("dot", "fusion", "custom-call"):
                    gemm = _gemm(module, inner_comp, inner)  # type: ignore[arg-type]
                    if gemm is not None:
                        total, dtype, found = total + gemm[0], dtype or gemm[1], True
        return (total, dtype) if found else None
    return None


def _peak_dtype(cost: CostModel, hlo_dtype: str) -> str:
    name = _DTYPES.get(hlo_dtype, (4, "float32"))[1]
    return name if name in cost.device.dtypes else "float32"


def collective_cost(module: HloModule, instr: Instr, cost: CostModel) -> InstrCost:
    """Duration of a collective (a synchronous one or the start of a pair)."""
    target, comp = module.collective_target(instr)
    kind = COLLECTIVE_KINDS[target.base_opcode]
    default_n = max(module.num_partitions, module.replica_count)
    n = target.group_size(default_n)
    if kind == "all_gather":
        pair = module.done_of.get(instr.name)
        result = module.entry[pair.done] if pair else target
        nbytes = result.nbytes
    elif kind == "permute":
        first = comp.by_name.get(target.operands[0]) if target.operands else None
        nbytes = first.nbytes if first else target.nbytes
    else:
        nbytes = comp.operand_bytes(target) or target.nbytes
    if kind == "permute":
        duration = cost.permute(nbytes)
    elif kind == "all_to_all":
        duration = cost.all_gather(nbytes, n)
    else:
        duration = cost.comm_duration(kind, nbytes, n)
    return InstrCost("comm", duration, bytes=nbytes, dtype=target.dtype)


def computation_duration(module: HloModule, name: str, cost: CostModel) -> float:
    """Summed duration of a computation's instructions (one kernel each)."""
    comp = module.computations.get(name)
    if comp is None:
        return 0.0
    return sum(instr_cost(module, comp, i, cost).duration_s for i in comp.instrs)


def instr_cost(module: HloModule, comp: Computation, instr: Instr, cost: CostModel) -> InstrCost:
    """Price one instruction of ``comp`` (see the module docstring for the rules)."""
    if instr.opcode in FREE_OPCODES:
        return InstrCost("free", 0.0)
    if instr.is_done:
        return InstrCost("marker", 0.0)
    if instr.is_collective or (instr.is_start and module.kind(instr) in COMM_KINDS):
        return collective_cost(module, instr, cost)
    if instr.opcode in ("call", "call-start") or (instr.is_start and module.kind(instr) == "call"):
        duration = sum(computation_duration(module, c, cost) for c in instr.called)
        return InstrCost("compute", duration)
    if instr.opcode == "while":
        trip = instr.backend_config.get("known_trip_count", {}).get("n", 1)
        body = instr.attrs.get("body", "").lstrip("%")
        return InstrCost("compute", int(trip) * computation_duration(module, body, cost))
    if instr.opcode == "conditional":
        branches = [computation_duration(module, c, cost) for c in instr.called]
        return InstrCost("compute", max(branches, default=0.0))
    nbytes = comp.operand_bytes(instr) + instr.nbytes
    gemm = _gemm(module, comp, instr)
    if gemm is not None:
        flops, dtype = gemm
        if instr.opcode == "custom-call" and instr.shapes:  # not the cuBLAS workspace
            nbytes = comp.operand_bytes(instr) + instr.shapes[0].nbytes
        peak = _peak_dtype(cost, dtype)
        return InstrCost("gemm", cost.op_duration(flops, nbytes, peak), flops, nbytes, dtype)
    return InstrCost("compute", cost.op_duration(0.0, nbytes, "float32"), 0.0, nbytes)


# -- coverage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective of the entry schedule and the compute XLA placed inside its window."""

    name: str  # the start (or the synchronous op)
    op_name: str
    kind: str
    is_async: bool
    duration_s: float
    compute_inside_s: float
    covered_s: float
    compute_names: tuple[str, ...]
    selected: bool = True
    done: str = ""
    scopes: tuple[str, ...] = ()

    @property
    def exposed_s(self) -> float:
        """Collective time no compute hides."""
        return self.duration_s - self.covered_s

    @property
    def overrun_s(self) -> float:
        """Compute inside beyond the collective: how long the done waits for work the
        scheduler put in the window (XLA readily puts whole secondary layers into a tiny
        primary window, which delays whatever depends on the done)."""
        return max(0.0, self.compute_inside_s - self.duration_s)


@dataclass(frozen=True)
class Coverage:
    """Per-collective records (all of them) and the covered fraction of the selected ones."""

    records: tuple[CollectiveRecord, ...]
    coverage: float
    total_s: float
    covered_s: float

    @property
    def selected(self) -> tuple[CollectiveRecord, ...]:
        return tuple(r for r in self.records if r.selected)

    @property
    def exposed_s(self) -> float:
        """Selected collective time left uncovered."""
        return self.total_s - self.covered_s

    @property
    def overrun_s(self) -> float:
        """Summed :attr:`CollectiveRecord.overrun_s` of the selected collectives."""
        return sum(r.overrun_s for r in self.selected)

    def __str__(self) -> str:
        lines = [
            f"coverage={self.coverage:.3f} ({self.covered_s * 1e6:.1f}/{self.total_s * 1e6:.1f} us)"
        ]
        for r in self.records:
            lines.append(
                f"  {'*' if r.selected else ' '} {r.name:28s} {r.kind:14s} "
                f"{'async' if r.is_async else 'sync ':5s} {r.duration_s * 1e6:8.1f} us  "
                f"inside {r.compute_inside_s * 1e6:8.1f} us  {r.op_name}"
            )
        return "\n".join(lines)


Predicate = Callable[[Instr], bool]


def is_primary_scope(scope: str = "primary") -> Predicate:
    """True for an instruction whose op_name (or, lacking one, an inherited op_name: see
    :attr:`Instr.scopes`) has ``scope`` as a path component (``.../primary/psum``)."""
    if not scope or "/" in scope:
        raise ValueError(f"scope={scope!r}: must be one non-empty name-stack component")

    def predicate(instr: Instr) -> bool:
        names = (instr.op_name,) if instr.op_name else instr.scopes
        return any(scope in name.split("/") for name in names)

    predicate.__name__ = f"is_scope_{scope}"
    return predicate


def _collectives(module: HloModule) -> Iterator[tuple[Instr, AsyncPair | None]]:
    for instr in module.entry.instrs:
        if instr.is_start:
            pair = module.done_of.get(instr.name)
            if module.kind(instr) in COMM_KINDS:
                yield instr, pair
        elif instr.is_collective and not instr.is_done:
            yield instr, None


def overlap_coverage(
    hlo: str | HloModule,
    cost: CostModel,
    *,
    is_primary: Predicate | None = None,
) -> Coverage:
    """How much of each entry collective's duration the schedule covers with compute.

    ``is_primary`` selects the collectives ``coverage`` is taken over (default: all); it is
    an error for it to select none when there are collectives (a lost tag would otherwise
    read as "nothing to hide"). With no selected time at all, ``coverage`` is 1.0.
    """
    module = hlo if isinstance(hlo, HloModule) else parse_hlo(hlo)
    entry = module.entry
    costs = {i.name: instr_cost(module, entry, i, cost) for i in entry.instrs}
    calls = [p for p in module.pairs if p.kind == "call"]
    records = []
    for start, pair in _collectives(module):
        duration = costs[start.name].duration_s
        is_async = pair is not None and not start.is_sync
        inside: list[str] = []
        if is_async and pair is not None:
            inside = [
                i.name
                for i in entry.instrs[pair.start_index + 1 : pair.done_index]
                if costs[i.name].is_compute and not i.is_start
            ]
            inside += [
                c.start
                for c in calls
                if c.start_index < pair.done_index and c.done_index > pair.start_index
            ]
        compute = sum(costs[n].duration_s for n in inside)
        done = entry[pair.done] if pair else start
        op_name = start.op_name or done.op_name
        records.append(
            CollectiveRecord(
                name=start.name,
                op_name=op_name,
                kind=module.kind(start),
                is_async=is_async,
                duration_s=duration,
                compute_inside_s=compute,
                covered_s=min(duration, compute),
                compute_names=tuple(inside),
                selected=True if is_primary is None else bool(is_primary(start)),
                done=pair.done if pair else "",
                scopes=start.scopes,
            )
        )
    chosen = [r for r in records if r.selected]
    if records and not chosen:
        seen = sorted({r.op_name or "<no op_name>" for r in records})
        raise ValueError(
            f"is_primary selected none of the {len(records)} collectives (op_names: {seen})"
        )
    total = sum(r.duration_s for r in chosen)
    covered = sum(r.covered_s for r in chosen)
    return Coverage(tuple(records), covered / total if total > 0 else 1.0, total, covered)
