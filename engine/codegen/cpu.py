"""The CPU driver: wraps the emitted formula body and reduction steps in OpenMP + SIMD loops.

Two C functions per plan and dtype, both running the same loop body (`kred_blocks`):

    int kred_run(void *const *args, long long r0, long long r1, long long c0, long long c1, void *const *outs,
                 int finalize, int nparts, int nthreads, long long rb, long long tj)
    int kred_grid(void *const *args, long long r0, long long r1, long long m, const long long *units,
                  const long long *tasks, long long ntasks, const long long *ranges, void *const *outs,
                  int finalize, int nthreads, long long rb, long long tj, long long work)

`kred_run` reduces rows [r0, r1) over columns [c0, c1); `kred_grid` reduces rows [r0, r1) as a block-sparse grid
(engine.grid) says, in one call: `ranges` holds the grid's column ranges (CSR), a unit is (rows i0..i1 of at most rb,
ranges o0..o1, part) and a task a run of consecutive units (engine.backends.cpu.grid_tasks batches small blocks so
that each task has enough work). `outs` holds one array per state slot (`finalize` = 0: partial states, the layout of
`engine.reductions`) or one per reduction output (`finalize` = 1). Both return 0, or 1 when memory ran out. The loops,
outermost first:

- tasks, shared by OpenMP threads (dynamic schedule). For `kred_run`: (block of `rb` rows) x (one of `nparts` column
  parts); `nparts` > 1 is the 2D split for small N: each part reduces its columns into its own state, merged at the
  end with the reduction's merge.
- column ranges of the unit, then column tiles of `tj` columns, sized so the tile's column data stays in L2 while
  every row of the block sweeps it.
- groups of ROWS rows (register blocking: each loaded column value serves ROWS rows). The last group of a block
  re-reads its last row for the missing ones and does not accumulate them, so the body is generated once.
- chunks of LANES consecutive columns, one per SIMD lane (`#pragma omp simd`). Column variables are first copied
  transposed (structure of arrays, by chunks of LANES columns) and zero-padded to a multiple of LANES, so every chunk
  is a full one; a column range that starts inside a chunk starts with that chunk. Lanes outside the range compute
  harmless values that are not accumulated.

Two accumulation strategies:
- "lanes" (Sum, Min/Max and their indices, LogSumExp family): each row keeps LANES copies of its state, lane l
  accumulating columns l, l + LANES, ...; the accumulate step itself vectorizes; lanes are merged at the end.
- "rows" (KMin family): the formula values of a chunk are computed vectorized, compared at once with the row's current
  K-th best (`c_candidate`), and only chunks holding a candidate go through the scalar insertion step.

Large dimensions: a squared distance `Sum(Square(x - y))` or scalar product `Sum(x * y)` between an i and a j variable
of dimension >= DOT_MIN_DIM is computed by a register-blocked loop over the dimension (ROWS rows x LANES columns of
accumulators, GEMM-like) instead of unrolled scalar code. The squared distance sums the squares of the differences
as written, never |x|^2 + |y|^2 - 2 x.y: that form cancels catastrophically on data far from the origin (at distance
100 from it, float32 nearest-neighbour distances were 17% off at D = 16; tests/test_cpu_backend.py).
"""
from __future__ import annotations

import re

from ..formula import I, J, P, Node
from ..plan import Plan
from .emit import Emitter, prelude

LANES = 16          # columns per SIMD chunk: one AVX-512 register of float32, two of float64
ROWS = 4            # rows per register-blocked group
TILE_BYTES = 65536  # column data per tile: stays in L2 while a block of rows sweeps it
DOT_MIN_DIM = 16
SMALL_WORK = 32768  # pairs below which one thread does everything (starting threads costs more)


def column_bytes(plan: Plan, itemsize: int) -> int:
    """Bytes of column data per column (for sizing tiles)."""
    return itemsize * max(1, sum(a.dim for a in plan.args if a.role == J))


def cpu_source(plan: Plan, real: str, acc: str) -> str:
    """The C source of `kred_run` for `plan`, with kred_real = `real` and kred_acc = `acc` ("float32"/"float64")."""
    return "\n".join([prelude("cpu", real, acc), "#include <stdlib.h>", f"#define KRED_LANES {LANES}",
                      "typedef kred_real kred_vec __attribute__((vector_size(KRED_LANES * sizeof(kred_real))));",
                      _Driver(plan).function()])


def _indent(lines: list[str], depth: int = 1) -> list[str]:
    pad = "    " * depth
    return [pad + line if line else line for line in lines]


def _dot_operands(node: Node):
    """(kind, i variable, j variable) when `node` is a large squared distance or scalar product, else None."""
    if node.op != "Sum" or node.children[0].dim < DOT_MIN_DIM:
        return None
    inner = node.children[0]
    if inner.op == "Square" and inner.children[0].op == "Subtract":
        kind, pair = "sqdist", inner.children[0].children
    elif inner.op == "Mult":
        kind, pair = "dot", inner.children
    else:
        return None
    if not all(v.op == "Var" for v in pair) or {v.params[2] for v in pair} != {I, J}:
        return None
    x, y = sorted(pair, key=lambda v: v.params[2])
    return kind, x, y


class _Driver:
    def __init__(self, plan: Plan):
        self.plan, self.reduction = plan, plan.reduction
        self.slots = plan.reduction.slots()
        self.lanes = plan.reduction.strategy == "lanes"
        self.roots = [plan.formula] + ([plan.formula2] if plan.formula2 is not None else [])
        self.rows = ROWS
        self._classify()

    # Which nodes are computed where ---------------------------------------------------------------------------
    def _classify(self):
        deps: dict[Node, frozenset] = {}
        self.dots: dict[Node, tuple] = {}         # large sqdist / scalar products, by node
        stack = list(self.roots)
        for root in self.roots:
            for node in root.postorder():
                if node not in deps:
                    deps[node] = frozenset((node.params[2],)) if node.op == "Var" else \
                        frozenset().union(*(deps[c] for c in node.children))
        # walk from the roots, not entering the operands of blocked products (they are never computed)
        seen = set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            found = _dot_operands(node)
            if found is not None:
                self.dots[node] = found
                continue
            stack.extend(node.children)
        order = [n for n in deps if n in seen and n not in self.dots]
        self.outer_nodes = [n for n in order if not deps[n] - {P}]
        self.row_nodes = [n for n in order if I in deps[n] and J not in deps[n]]
        self.col_nodes = [n for n in order if J in deps[n] and I not in deps[n]]
        self.pairs = sorted(set(self.dots.values()), key=lambda p: (p[0], p[1].params, p[2].params))

    # Loads ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_outer(var: Node, k: int) -> str:
        return f"a{var.params[0]}[{k}]"          # parameters; other categories never reach the outer emitter

    @staticmethod
    def _load_row(r: int):
        def load(var: Node, k: int) -> str:
            pos, dim, _ = var.params
            return f"a{pos}[ir{r} * {dim} + {k}]"
        return load

    @staticmethod
    def _load_col(var: Node, k: int) -> str:
        pos, dim, _ = var.params
        return f"t{pos}[(jj - c0) * {dim} + {k} * KRED_LANES + l]"

    # State accessors ------------------------------------------------------------------------------------------
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
        return (["if (finalize) {"] + _indent(self.reduction.c_finalize(state, self._output(True))) +
                ["} else {"] + _indent(copy) + ["}"])

    # The group of ROWS rows against one column tile --------------------------------------------------------
    def _blocked_products(self) -> tuple[list[str], dict]:
        """Per chunk: the squared distance or scalar product of each (i, j) variable pair, for every row and lane."""
        lines, names = [], {}
        for p, (kind, x, y) in enumerate(self.pairs):
            dim = x.dim
            for r in range(self.rows):
                lines.append(f"kred_vec dot{p}r{r} = {{0}};")
            lines.append(f"for (int d = 0; d < {dim}; d++) {{")
            lines.append("    kred_vec yv;")
            lines.append(f"    memcpy(&yv, &t{y.params[0]}[(jj - c0) * {dim} + d * KRED_LANES], sizeof yv);")
            for r in range(self.rows):
                row = f"a{x.params[0]}[ir{r} * {dim} + d]"
                lines.append(f"    dot{p}r{r} += {row} * yv;" if kind == "dot" else
                             f"    {{ const kred_vec t = yv - {row}; dot{p}r{r} += t * t; }}")
            lines.append("}")
            for r in range(self.rows):
                lines.append(f"kred_real dots{p}r{r}[KRED_LANES]; memcpy(dots{p}r{r}, &dot{p}r{r}, sizeof dots{p}r{r});")
                names[(kind, x, y, r)] = f"dots{p}r{r}[l]"
        return lines, names

    def _group(self) -> list[str]:
        """Rows ir0 .. ir{ROWS-1} (block offsets ib ..) against columns [jt, jend)."""
        outer = self._outer.values
        lines, row_values = [], []
        for r in range(self.rows):
            lines.append(f"const long long ir{r} = i + {r} < i1 ? i + {r} : i1 - 1;")
            if r:
                lines.append(f"const int ok{r} = i + {r} < i1;")
        for r in range(self.rows):
            e = Emitter(self._load_row(r), prefix=f"h{r}x", known=outer, copy_vars=True)
            for node in self.row_nodes:
                e.emit(node)
            lines += e.lines
            row_values.append(e.values)
        fd = self.reduction.fdim
        bounds = []
        if not self.lanes:
            lines.append(f"kred_real fb[{self.rows * fd} * KRED_LANES];")
        chunk, names = self._blocked_products()
        body = []
        cols = Emitter(self._load_col, prefix="u", known=outer, copy_vars=True)
        for node in self.col_nodes:
            cols.emit(node)
        body += cols.lines
        accumulate = []
        for r in range(self.rows):
            known = {**cols.values, **row_values[r]}
            for node, pair in self.dots.items():
                known[node] = [names[pair + (r,)]]
            e = Emitter(self._load_col, prefix=f"f{r}x", known=known, copy_vars=True)
            f = e.emit(self.plan.formula)
            f2 = e.emit(self.plan.formula2) if self.plan.formula2 is not None else None
            body += e.lines
            # pc0 <= jj + l < jend in one unsigned comparison (lanes before a range's first column are masked too)
            guard = "(unsigned long long)(jj + l - pc0) < (unsigned long long)(jend - pc0)" + (f" && ok{r}" if r else "")
            if self.lanes:
                accumulate += [f"if ({guard}) {{"] + \
                    _indent(self.reduction.c_accumulate(self._row_state(r), f, f2, "jj + l")) + ["}"]
            else:
                for c in range(fd):
                    body.append(f"fb[{r * fd + c} * KRED_LANES + l] = {f[c]};")
                    candidate = self.reduction.c_candidate(self._row_state(r), c, f[c])
                    bounds.append(f"hit |= {candidate};")     # lanes outside the range only cost a scalar pass
        if self.lanes:
            chunk += ["#pragma omp simd", "for (int l = 0; l < KRED_LANES; l++) {"] + \
                _indent(body + accumulate) + ["}"]
        else:
            # the K-th best only improves while the chunk is folded in, so testing against its start value is safe
            chunk += ["int hit = 0;", "#pragma omp simd reduction(|:hit)", "for (int l = 0; l < KRED_LANES; l++) {"]
            chunk += _indent(body + bounds) + ["}"]
            chunk += ["if (hit) {", "    const int width = jend - jj < KRED_LANES ? (int)(jend - jj) : KRED_LANES;"]
            for r in range(self.rows):
                values = [f"fb[{r * fd + c} * KRED_LANES + l]" for c in range(fd)]
                steps = self.reduction.c_accumulate(self._row_state(r), values, None, "jj + l")
                # lanes before the range's first column (its first chunk starts on a multiple of KRED_LANES)
                chunk += _indent([f"if ({'1' if r == 0 else f'ok{r}'}) for (int l = 0; l < width; l++) {{",
                                  "    if (jj + l < pc0) continue;"] + _indent(steps) + ["}"])
            chunk += ["}"]
        lines += ["for (long long jj = jt; jj < jend; jj += KRED_LANES) {"] + _indent(chunk) + ["}"]
        return ["{"] + _indent(lines) + ["}"]

    # The functions ------------------------------------------------------------------------------------------
    def function(self) -> str:
        """`kred_blocks` (what each thread runs: its share of the tasks), `kred_run` (a dense call: copies, threads,
        the 2D split and its merge) and `kred_grid` (a block-sparse call: the grid's units and tasks, see
        engine.backends.cpu.grid_tasks).

        Small problems call kred_blocks directly: entering even an `if(0)` OpenMP region costs about a microsecond,
        which matters for the warm-call latency."""
        plan, slots = self.plan, self.slots
        self._outer = Emitter(self._load_outer, prefix="o", copy_vars=True)
        for node in self.outer_nodes:
            self._outer.emit(node)
        self.columns = [a for a in plan.args if a.role == J]
        per_row = LANES if self.lanes else 1
        # what kred_blocks receives
        shared = [f"const kred_real *restrict a{a.pos}" for a in plan.args]
        shared += [f"const kred_real *restrict t{a.pos}" for a in self.columns]
        shared += [f"{slot.ctype} *restrict q{s}" for s, slot in enumerate(slots)]
        shared += ["void *const *outs", "const int finalize", "const int nparts", "const long long n",
                   "const long long r0", "const long long c0",
                   "const long long *restrict units", "const long long *restrict tasks", "const long long ntasks",
                   "const long long *restrict ranges", "const long long rb", "const long long tj", "int *failed"]
        names = [re.findall(r"\w+", decl)[-1] for decl in shared]
        self._call = "kred_blocks(" + ", ".join("&failed" if name == "failed" else name for name in names) + ");"

        # A unit is rows [i0, i1) (at most rb) reduced over column ranges o0 .. o1 - 1 of `ranges`, into column part
        # `part`; a task is a run of consecutive units (small blocks batched), handed to one thread at a time.
        par = [f"{slot.ctype} *restrict s{s} = ({slot.ctype} *)malloc(sizeof({slot.ctype}) * "
               f"(size_t)(rb * {slot.width} * {per_row}));" for s, slot in enumerate(self.reduction.working_slots())]
        par += ["const int ok = " + " && ".join(f"s{s} != NULL" for s in range(len(slots))) + ";",
                "if (!ok) {", "    #pragma omp atomic write", "    *failed = 1;", "}"]
        par += self._outer.lines
        par += ["#pragma omp for schedule(dynamic, 1)",
                "for (long long task = 0; task < ntasks; task++) {",
                "    if (!ok) continue;",
                "    for (long long u = tasks[task]; u < tasks[task + 1]; u++) {"]
        unit = ["const long long i0 = units[5 * u], i1 = units[5 * u + 1], o1 = units[5 * u + 3];",
                "const long long part = units[5 * u + 4];",
                "long long first = KRED_NO_INDEX;     /* the lowest column the unit reduces (Reduction.c_start) */",
                "for (long long o = units[5 * u + 2]; o < o1; o++)",
                "    if (ranges[2 * o] < ranges[2 * o + 1] && ranges[2 * o] < first) first = ranges[2 * o];",
                "for (long long ib = 0; ib < i1 - i0; ib++) {"]
        init = self.reduction.c_init(self._row_state(0)) + self.reduction.c_start(self._row_state(0), "first")
        if self.lanes:
            init = ["for (int l = 0; l < KRED_LANES; l++) {"] + _indent(init) + ["}"]
        unit += _indent(init) + ["}"]
        unit += ["for (long long o = units[5 * u + 2]; o < o1; o++) {",
                 "    const long long pc0 = ranges[2 * o], pc1 = ranges[2 * o + 1];",
                 "    /* chunks start on multiples of KRED_LANES (the packed layout): lanes before pc0 are masked */",
                 "    for (long long jt = pc0 - (pc0 - c0) % KRED_LANES; jt < pc1; jt += tj) {",
                 "        const long long jend = jt + tj < pc1 ? jt + tj : pc1;",
                 f"        for (long long i = i0; i < i1; i += {self.rows}) {{",
                 "            const long long ib = i - i0;"]
        unit += _indent(self._group(), 3)
        unit += ["        }", "    }", "}", "for (long long ib = 0; ib < i1 - i0; ib++) {"]
        row = []
        if self.lanes:
            row += ["for (int lane = 1; lane < KRED_LANES; lane++) {"]
            row += _indent(self.reduction.c_merge(self._lane_state("0"), self._lane_state("lane")))
            row += ["}"]
        first = self._lane_state("0")
        row += ["const long long row = i0 - r0 + ib;", "if (nparts > 1) {"]
        row += _indent([f"for (int q = 0; q < {slot.width}; q++) {self._part_state('part')(s, 'q')} = {first(s, 'q')};"
                        for s, slot in enumerate(slots)])
        row += ["} else {"] + _indent(self._store(first)) + ["}"]
        unit += _indent(row) + ["}"]
        par += _indent(unit, 2) + ["    }", "}"]
        par += [f"free(s{s});" for s in range(len(slots))]
        blocks = ["static void kred_blocks(" + ", ".join(shared) + ")", "{"] + _indent(par) + ["}"]
        return "\n".join(blocks + [""] + self._dense() + [""] + self._sparse()) + "\n"

    def _pack(self) -> list[str]:
        """Copy the columns [c0, c1) of every j variable into t<pos>, packed by chunks of KRED_LANES columns (each
        chunk holds component 0 of its columns, then component 1, ...: contiguous for the SIMD lanes and for the
        dimension loop of blocked products) and zero-padded. Needs c0, mc, mp, parallel and failed."""
        body = []
        for a in self.columns:
            body += [f"kred_real *restrict t{a.pos} = (kred_real *)calloc((size_t)({a.dim} * mp + KRED_LANES), "
                     "sizeof(kred_real));", f"if (!t{a.pos}) failed = 1;"]
        if self.columns:
            copy = ["for (long long j = 0; j < mc; j++) {"]
            for a in self.columns:
                if a.dim == 1:
                    copy.append(f"    t{a.pos}[j] = a{a.pos}[c0 + j];")
                else:
                    copy.append(f"    for (int k = 0; k < {a.dim}; k++) "
                                f"t{a.pos}[(j - j % KRED_LANES) * {a.dim} + k * KRED_LANES + j % KRED_LANES] = "
                                f"a{a.pos}[(c0 + j) * {a.dim} + k];")
            copy += ["}"]
            body += ["if (failed) {",
                     "} else if (parallel) {",
                     "    #pragma omp parallel for num_threads(nthreads) schedule(static)"] + _indent(copy) + \
                    ["} else {"] + _indent(copy) + ["}"]
        return body

    def _free(self) -> list[str]:
        return [f"free(t{a.pos});" for a in self.columns] + [f"free(q{s});" for s in range(len(self.slots))]

    def _run_blocks(self) -> list[str]:
        return ["if (failed) {", "} else if (parallel) {", "    #pragma omp parallel num_threads(nthreads)",
                "    " + self._call, "} else {", "    " + self._call, "}"]

    def _dense(self) -> list[str]:
        """kred_run: rows [r0, r1) over columns [c0, c1) as row blocks of rb x `nparts` column parts."""
        plan, slots = self.plan, self.slots
        body = [f"const kred_real *restrict a{a.pos} = (const kred_real *)args[{a.pos}];" for a in plan.args]
        body += ["const long long n = r1 - r0, mc = c1 - c0;",
                 "const long long mp = (mc + KRED_LANES - 1) / KRED_LANES * KRED_LANES;   /* padded columns */",
                 f"const int parallel = nthreads > 1 && n * (mc > 0 ? mc : 1) > {SMALL_WORK};",
                 "int failed = 0;"]
        body += self._pack()
        # states of the column parts (2D split)
        body += [f"{slot.ctype} *restrict q{s} = NULL;" for s, slot in enumerate(slots)]
        body.append("if (nparts > 1) {")
        for s, slot in enumerate(slots):
            body += [f"    q{s} = ({slot.ctype} *)malloc(sizeof({slot.ctype}) * (size_t)(nparts * n * {slot.width} + 1));",
                     f"    if (!q{s}) failed = 1;"]
        body += ["}",
                 "/* the dense grid: one unit per (block of rb rows, column part), one unit per task */",
                 "const long long ntasks = (n + rb - 1) / rb * nparts;",
                 "long long *units = (long long *)malloc(sizeof(long long) * (size_t)(5 * ntasks + 1));",
                 "long long *tasks = (long long *)malloc(sizeof(long long) * (size_t)(ntasks + 1));",
                 "long long *ranges = (long long *)malloc(sizeof(long long) * (size_t)(2 * nparts));",
                 "if (!units || !tasks || !ranges) failed = 1;",
                 "if (!failed) {",
                 "    for (long long part = 0; part < nparts; part++) {",
                 "        ranges[2 * part] = c0 + (mc * part / nparts) / KRED_LANES * KRED_LANES;",
                 "        ranges[2 * part + 1] = part + 1 == nparts ? c1 : c0 + (mc * (part + 1) / nparts) / KRED_LANES * KRED_LANES;",
                 "    }",
                 "    for (long long t = 0; t < ntasks; t++) {",
                 "        const long long i0 = r0 + t / nparts * rb, part = t % nparts;",
                 "        units[5 * t] = i0; units[5 * t + 1] = i0 + rb < r1 ? i0 + rb : r1;",
                 "        units[5 * t + 2] = part; units[5 * t + 3] = part + 1; units[5 * t + 4] = part;",
                 "        tasks[t] = t;",
                 "    }",
                 "    tasks[ntasks] = ntasks;",
                 "}"]
        body += self._run_blocks()
        # merge the column parts
        merge = ["for (long long part = 1; part < nparts; part++) {"]
        merge += _indent(self.reduction.c_merge(self._part_state("0"), self._part_state("part"))) + ["}"]
        merge += self._store(self._part_state("0"))
        body += ["if (nparts > 1 && !failed) {",
                 "    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && n > 256)",
                 "    for (long long row = 0; row < n; row++) {"] + _indent(merge, 2) + ["    }", "}"]
        body += self._free() + ["free(units);", "free(tasks);", "free(ranges);", "return failed;"]
        head = ["int kred_run(void *const *args, const long long r0, const long long r1, const long long c0,",
                "             const long long c1, void *const *outs, const int finalize, const int nparts,",
                "             const int nthreads, const long long rb, const long long tj)", "{"]
        return head + _indent(body) + ["}"]

    def _sparse(self) -> list[str]:
        """kred_grid: rows [r0, r1) as the units and tasks of a grid (engine.grid), over columns [0, m)."""
        plan, slots = self.plan, self.slots
        body = [f"const kred_real *restrict a{a.pos} = (const kred_real *)args[{a.pos}];" for a in plan.args]
        body += ["const long long n = r1 - r0, c0 = 0, c1 = m, mc = m;",
                 "const long long mp = (mc + KRED_LANES - 1) / KRED_LANES * KRED_LANES;   /* padded columns */",
                 f"const int parallel = nthreads > 1 && work > {SMALL_WORK};",
                 "const int nparts = 1;",
                 "int failed = 0;",
                 "(void)c1;"]
        body += self._pack()
        body += [f"{slot.ctype} *restrict q{s} = NULL;" for s, slot in enumerate(slots)]
        body += self._run_blocks() + self._free() + ["return failed;"]
        head = ["int kred_grid(void *const *args, const long long r0, const long long r1, const long long m,",
                "              const long long *units, const long long *tasks, const long long ntasks,",
                "              const long long *ranges, void *const *outs, const int finalize, const int nthreads,",
                "              const long long rb, const long long tj, const long long work)", "{"]
        return head + _indent(body) + ["}"]
