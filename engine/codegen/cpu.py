"""The CPU driver: wraps the emitted formula body and reduction steps in OpenMP + SIMD loops.

One C function per plan and dtype:

    int kred_run(void *const *args, long long r0, long long r1, long long c0, long long c1, void *const *outs,
                 int finalize, int nparts, int nthreads, long long rb, long long tj)

reduces rows [r0, r1) over columns [c0, c1). `outs` holds one array per state slot (`finalize` = 0: partial states,
the layout of `engine.reductions`) or one per reduction output (`finalize` = 1). It returns 0, or 1 when memory ran
out. The loops, outermost first:

- tasks = (block of `rb` rows) x (one of `nparts` column parts), shared by OpenMP threads. `nparts` > 1 is the 2D
  split for small N: each part reduces its columns into its own state, merged at the end with the reduction's merge.
- column tiles of `tj` columns, sized so the tile's column data stays in L1 while every row of the block sweeps it.
- groups of ROWS rows (register blocking: each loaded column value serves ROWS rows).
- chunks of LANES consecutive columns, one per SIMD lane (`#pragma omp simd`). Columns variables with more than one
  component are copied transposed (structure of arrays) first, so lane loads are contiguous.

Two accumulation strategies:
- "lanes" (Sum, Min/Max and their indices, LogSumExp family): each row keeps LANES copies of its state, lane l
  accumulating columns l, l + LANES, ...; the accumulate step itself vectorizes; lanes are merged at the end.
- "rows" (KMin family): the formula values of a chunk are computed vectorized into a buffer, then folded into one
  sorted list per row by the scalar insertion step, whose first comparison rejects almost every candidate.
"""
from __future__ import annotations

from ..formula import I, J, P, Node
from ..plan import Plan
from ..reductions.monoids import KMin
from .emit import Emitter, accumulate_steps, finalize_steps, init_steps, merge_steps, prelude, state_slots

LANES = 16          # columns per SIMD chunk: one AVX-512 register of float32, two of float64
ROWS = 4            # rows per register-blocked group
L1_TILE_BYTES = 16384


def strategy(plan: Plan) -> str:
    return "rows" if isinstance(plan.reduction, KMin) else "lanes"


def column_bytes(plan: Plan, itemsize: int) -> int:
    """Bytes of column data per column (for sizing tiles)."""
    return itemsize * max(1, sum(a.dim for a in plan.args if a.role == J))


def cpu_source(plan: Plan, real: str, acc: str) -> str:
    """The C source of `kred_run` for `plan`, with kred_real = `real` and kred_acc = `acc` ("float32"/"float64")."""
    return "\n".join([prelude("cpu", real, acc), "#include <stdlib.h>", f"#define KRED_LANES {LANES}",
                      _Driver(plan).function()])


def _indent(lines: list[str], depth: int = 1) -> list[str]:
    pad = "    " * depth
    return [pad + line if line else line for line in lines]


class _Driver:
    def __init__(self, plan: Plan):
        self.plan, self.reduction = plan, plan.reduction
        self.slots = state_slots(plan.reduction)
        self.lanes = strategy(plan) == "lanes"
        self.roots = [plan.formula] + ([plan.formula2] if plan.formula2 is not None else [])
        self._classify()

    # Which nodes can be hoisted where ---------------------------------------------------------------------
    def _classify(self):
        deps: dict[Node, frozenset] = {}
        order: list[Node] = []
        for root in self.roots:
            for node in root.postorder():
                if node in deps:
                    continue
                if node.op == "Var":
                    deps[node] = frozenset((node.params[2],))
                else:
                    deps[node] = frozenset().union(*(deps[c] for c in node.children))
                order.append(node)
        self.outer_nodes = [n for n in order if not deps[n] - {P}]
        self.row_nodes = [n for n in order if I in deps[n] and J not in deps[n]]
        self.col_nodes = [n for n in order if J in deps[n] and I not in deps[n]]

    # Loads ------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_outer(var: Node, k: int) -> str:
        return f"a{var.params[0]}[{k}]"          # parameters; other categories never reach the outer emitter

    @staticmethod
    def _load_row(r: int):
        def load(var: Node, k: int) -> str:
            pos, dim, _ = var.params
            return f"a{pos}[(i + {r}) * {dim} + {k}]"
        return load

    @staticmethod
    def _load_col(var: Node, k: int) -> str:
        pos, dim, _ = var.params
        if dim == 1:
            return f"a{pos}[jj + l]"
        return f"t{pos}[{k} * mc + (jj - c0 + l)]"

    # State accessors ----------------------------------------------------------------------------------------
    def _row_state(self, r):
        """The state a group row accumulates into: its lane l (lanes) or its single state (rows)."""
        if self.lanes:
            return lambda s, c: f"s{s}[((ib + {r}) * {self.slots[s].width} + ({c})) * KRED_LANES + l]"
        return lambda s, c: f"s{s}[(ib + {r}) * {self.slots[s].width} + ({c})]"

    def _lane_state(self, lane: str):
        if self.lanes:
            return lambda s, c: f"s{s}[(ib * {self.slots[s].width} + ({c})) * KRED_LANES + {lane}]"
        return lambda s, c: f"s{s}[ib * {self.slots[s].width} + ({c})]"

    def _part_state(self, part: str):
        return lambda s, c: f"q{s}[({part} * n + row) * {self.slots[s].width} + ({c})]"

    def _output(self, finalize: bool):
        if finalize:
            kinds = [kind for kind, _ in self.reduction.outputs]
            widths = [w for _, w in self.reduction.outputs]
            types = ["kred_real" if kind == "value" else "kred_index" for kind in kinds]
            return lambda o, c: f"(({types[o]} *)outs[{o}])[row * {widths[o]} + ({c})]"
        return lambda s, c: f"(({self.slots[s].ctype} *)outs[{s}])[row * {self.slots[s].width} + ({c})]"

    def _store(self, state) -> list[str]:
        """Finalize `state` into the outputs, or copy it out as a partial state."""
        copy = [f"for (int q = 0; q < {slot.width}; q++) {self._output(False)(s, 'q')} = {state(s, 'q')};"
                for s, slot in enumerate(self.slots)]
        return (["if (finalize) {"] + _indent(finalize_steps(self.reduction, state, self._output(True))) +
                ["} else {"] + _indent(copy) + ["}"])

    # Code ---------------------------------------------------------------------------------------------------
    def _group(self, rows: int) -> list[str]:
        """Rows i .. i + rows - 1 (block offset ib) against columns [jt, jend)."""
        outer = self._outer.values
        lines, row_values = [], []
        for r in range(rows):
            e = Emitter(self._load_row(r), prefix=f"h{r}x", known=outer, copy_vars=True)
            for node in self.row_nodes:
                e.emit(node)
            lines += e.lines
            row_values.append(e.values)
        body = []
        cols = Emitter(self._load_col, prefix="u", known=outer, copy_vars=True)
        for node in self.col_nodes:
            cols.emit(node)
        body += cols.lines
        fd = self.reduction.fdim
        for r in range(rows):
            e = Emitter(self._load_col, prefix=f"f{r}x", known={**cols.values, **row_values[r]}, copy_vars=True)
            f = e.emit(self.plan.formula)
            f2 = e.emit(self.plan.formula2) if self.plan.formula2 is not None else None
            body += e.lines
            if self.lanes:
                body += accumulate_steps(self.reduction, self._row_state(r), f, f2, "jj + l")
            else:
                body += [f"fb[{r * fd + c} * KRED_LANES + l] = {f[c]};" for c in range(fd)]
        if not self.lanes:
            lines.append(f"kred_real fb[{rows * fd} * KRED_LANES];")
        fold = []
        if not self.lanes:
            for r in range(rows):
                values = [f"fb[{r * fd + c} * KRED_LANES + l]" for c in range(fd)]
                fold += accumulate_steps(self.reduction, self._row_state(r), values, None, "jj + l")
        chunk = (["#pragma omp simd", "for (int l = 0; l < width; l++) {"] + _indent(body) + ["}"] +
                 (["for (int l = 0; l < width; l++) {"] + _indent(fold) + ["}"] if fold else []))
        lines += ["for (long long jj = jt; jj < jend; jj += KRED_LANES) {",
                  "    if (jj + KRED_LANES <= jend) {",
                  "        const int width = KRED_LANES;   /* a full chunk: constant trip count */"]
        lines += _indent(chunk, 2)
        lines += ["    } else {", "        const int width = (int)(jend - jj);"]
        lines += _indent(chunk, 2)
        lines += ["    }", "}"]
        return ["{"] + _indent(lines) + ["}"]

    def function(self) -> str:
        plan, slots = self.plan, self.slots
        self._outer = Emitter(self._load_outer, prefix="o", copy_vars=True)
        for node in self.outer_nodes:
            self._outer.emit(node)
        copies = [a for a in plan.args if a.role == J and a.dim > 1]
        per_row = LANES if self.lanes else 1
        src = []
        w = src.append
        w("int kred_run(void *const *args, const long long r0, const long long r1, const long long c0,")
        w("             const long long c1, void *const *outs, const int finalize, const int nparts,")
        w("             const int nthreads, const long long rb, const long long tj)")
        w("{")
        body = []
        b = body.append
        for a in plan.args:
            b(f"const kred_real *restrict a{a.pos} = (const kred_real *)args[{a.pos}];")
        b("const long long n = r1 - r0, mc = c1 - c0;")
        b("const long long work = n * (mc > 0 ? mc : 1);")
        b("int failed = 0;")
        # column variables transposed: t[k * mc + (j - c0)]
        for a in copies:
            b(f"kred_real *restrict t{a.pos} = (kred_real *)malloc(sizeof(kred_real) * (size_t)({a.dim} * mc + 1));")
            b(f"if (!t{a.pos}) failed = 1;")
        if copies:
            b("if (!failed) {")
            b("    #pragma omp parallel for num_threads(nthreads) schedule(static) if (work > 65536)")
            b("    for (long long j = 0; j < mc; j++) {")
            for a in copies:
                for k in range(a.dim):
                    b(f"        t{a.pos}[{k} * mc + j] = a{a.pos}[(c0 + j) * {a.dim} + {k}];")
            b("    }")
            b("}")
        # states of the column parts (2D split)
        for s, slot in enumerate(slots):
            b(f"{slot.ctype} *restrict q{s} = NULL;")
        b("if (nparts > 1) {")
        for s, slot in enumerate(slots):
            b(f"    q{s} = ({slot.ctype} *)malloc(sizeof({slot.ctype}) * (size_t)(nparts * n * {slot.width} + 1));")
            b(f"    if (!q{s}) failed = 1;")
        b("}")
        b("const long long nblocks = (n + rb - 1) / rb;")
        b("if (!failed) {")
        b("#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && work > 32768)")
        b("{")
        par = []
        p = par.append
        for s, slot in enumerate(slots):
            p(f"{slot.ctype} *restrict s{s} = ({slot.ctype} *)malloc(sizeof({slot.ctype}) * "
              f"(size_t)(rb * {slot.width} * {per_row}));")
        p("const int ok = " + " && ".join(f"s{s} != NULL" for s in range(len(slots))) + ";")
        p("if (!ok) {")
        p("    #pragma omp atomic write")
        p("    failed = 1;")
        p("}")
        par += self._outer.lines
        p("#pragma omp for schedule(dynamic, 1)")
        p("for (long long task = 0; task < nblocks * nparts; task++) {")
        task = []
        t = task.append
        t("if (!ok) continue;")
        t("const long long blk = task / nparts, part = task % nparts;")
        t("const long long i0 = r0 + blk * rb, i1 = i0 + rb < r1 ? i0 + rb : r1;")
        t("/* part boundaries on multiples of KRED_LANES, the last part ends at c1 */")
        t("const long long pc0 = c0 + (mc * part / nparts) / KRED_LANES * KRED_LANES;")
        t("const long long pc1 = part + 1 == nparts ? c1 : c0 + (mc * (part + 1) / nparts) / KRED_LANES * KRED_LANES;")
        t("for (long long ib = 0; ib < i1 - i0; ib++) {")
        if self.lanes:
            task += _indent(["for (int l = 0; l < KRED_LANES; l++) {"] + _indent(init_steps(self.reduction, self._row_state(0))) + ["}"])
        else:
            task += _indent(init_steps(self.reduction, self._row_state(0)))
        t("}")
        t("for (long long jt = pc0; jt < pc1; jt += tj) {")
        t("    const long long jend = jt + tj < pc1 ? jt + tj : pc1;")
        t("    long long i = i0;")
        t(f"    for (; i + {ROWS} <= i1; i += {ROWS}) {{")
        t("        const long long ib = i - i0;")
        task += _indent(self._group(ROWS), 2)
        t("    }")
        t("    for (; i < i1; i++) {")
        t("        const long long ib = i - i0;")
        task += _indent(self._group(1), 2)
        t("    }")
        t("}")
        t("for (long long ib = 0; ib < i1 - i0; ib++) {")
        row = []
        if self.lanes:
            row += ["for (int lane = 1; lane < KRED_LANES; lane++) {"]
            row += _indent(merge_steps(self.reduction, self._lane_state("0"), self._lane_state("lane")))
            row += ["}"]
        row += ["const long long row = i0 - r0 + ib;", "if (nparts > 1) {"]
        first = self._lane_state("0")
        row += _indent([f"for (int q = 0; q < {slot.width}; q++) {self._part_state('part')(s, 'q')} = {first(s, 'q')};"
                        for s, slot in enumerate(slots)])
        row += ["} else {"] + _indent(self._store(first)) + ["}"]
        task += _indent(row)
        t("}")
        par += _indent(task)
        p("}")
        par += [f"free(s{s});" for s in range(len(slots))]
        body += _indent(par)
        b("}")
        b("}")
        # merge the column parts
        b("if (nparts > 1 && !failed) {")
        b("    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && n > 256)")
        b("    for (long long row = 0; row < n; row++) {")
        merge = ["for (long long part = 1; part < nparts; part++) {"]
        merge += _indent(merge_steps(self.reduction, self._part_state("0"), self._part_state("part")))
        merge += ["}"]
        merge += self._store(self._part_state("0"))
        body += _indent(merge, 2)
        b("    }")
        b("}")
        body += [f"free(t{a.pos});" for a in copies]
        body += [f"free(q{s});" for s in range(len(slots))]
        b("return failed;")
        src += _indent(body)
        w("}")
        return "\n".join(src) + "\n"
