"""CUDA driver templates: the loops, memory staging and launch shapes around the shared emitter's pieces.

One generated module holds four kernels for a (plan, dtype, accumulator) triple; `engine.backends.cuda` compiles it
with NVRTC, chooses the launches (`schedule`: 1D or 2D scheme, slices of large states) and runs them. This module
only writes source. Rows are the plan's category-0 variables (one output row each), columns category 1.

    kred_final(r0, rows, c0, c1, span, arg0, arg1, ..., out0, ...)      1D scheme: reduce and finalize
    kred_state(r0, rows, c0, c1, span, arg0, arg1, ..., state0, ...)    the same, writing partial states
    kred_merge_final(rows, splits, state0, ..., out0, ...)              2D scheme, second pass: merge and finalize
    kred_merge_state(rows, splits, state0, ..., merged0, ...)           the same, writing one merged state
    kred_grid_final(r0, c0, c1, units, ranges, arg0, ..., out0, ...)    block-sparse: a block per unit of a grid
    kred_grid_state(r0, c0, c1, units, ranges, arg0, ..., state0, ...)  the same, writing partial states

Scheme. One thread per output row i (`blockIdx.x`), its i-variables and the i/parameter-only part of the formula
computed once into registers. Columns come in tiles of `block` (= threads per block): the whole block copies a tile
of every j-variable into shared memory (coalesced: a tile of a row-major (M, D) array is one contiguous span), then
each thread folds the tile's columns into its registers. `blockIdx.y` splits the columns into `splits` spans of `span`
columns (the 2D scheme): each writes its partial state to `state[split][row]`, and the merge kernel folds them with
the reduction's `merge` step — the same monoid as between tiles, between shards and between nodes.

Accumulation. Each thread keeps the reduction's state in the accumulator type (`kred_acc`, float64 under
dtype_acc="auto"). When that type is wider than the formula's (`kred_real`), the columns of one tile are folded into a
tile state of the real type first, then merged into the running state once per tile ("block sums", as in KeOps): the
per-pair work stays in fast single precision and the error grows with the tile length, not with M. Within the tile
code the accumulator names of the prelude are aliased to the real ones by macros (`#define kred_acc kred_real`), so
the reduction steps are used as they are.

float16 inputs are stored as 16-bit words and converted with PTX `cvt` instructions when tiles are staged (no
cuda_fp16.h: NVRTC needs no header at all); the formula runs in float32, and results are rounded back to float16.

Large dimensions. The unrolled body keeps one register per live component: past `CHUNK_THRESHOLD` components of
i-variables, `Sum` nodes over elementwise expressions (SqDist, Scalprod, SqNorm2 of differences...) are evaluated in
chunks of `CHUNK` components: for a tile, each chunk of x_i is loaded from global memory (L1-cached) into registers,
the same chunk of the tile's j-variables is staged in shared memory, and the partial sums of every column of the tile
are accumulated in shared memory, so registers and shared memory stay bounded by the chunk size, whatever D is. See
`_chunk_plan`.

Shared memory (`_lay_out`). Per block: the staged j-tile (block x stride), the chunk staging area (block x CHUNK per
j-variable of a chunked Sum) and the chunked partial sums (block x block per chunked Sum). The block is the largest
that fits `SHARED_BUDGET` (64 KiB, or the device's limit if lower: more shared memory per block, fewer blocks per
SM), but at least `PREFERRED_BLOCK` threads where the device's limit allows (chunked sums at D = 1000 in float32:
128 threads, 82 KB); failing that, the largest that fits `shared_limit` (the device's opt-in maximum,
cudaDevAttrMaxSharedMemoryPerBlockOptin, which the runtime queries). Above 48 KiB the launcher opts in
(cudaFuncAttributeMaxDynamicSharedMemorySize). Failing that, the widest j-variables are read from global memory
(L1/L2-cached) instead of being staged, until the rest fits. So any D runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BackendError
from ..formula import I, J, Node, make
from ..plan import Plan
from . import affine
from .emit import Emitter, depends_on, prelude
from ..reductions import Slot

KERNELS = ("kred_final", "kred_state", "kred_merge_final", "kred_merge_state", "kred_grid_final",
           "kred_grid_state")
STORAGE = {"float16": "kred_half", "float32": "float", "float64": "double"}
REAL = {"float16": "float32", "float32": "float32", "float64": "float64"}
NUMPY_STATE = {"kred_acc": "acc", "kred_real": "real", "kred_index": "index"}

MAX_BLOCK = 256                 # threads per block and columns per tile
MIN_BLOCK = 32
PREFERRED_BLOCK = 128           # the smallest block chosen when the device's shared memory allows it
SHARED_DEFAULT = 48 * 1024      # bytes per block without opting in; above this the launcher opts in
                                # (cudaFuncAttributeMaxDynamicSharedMemorySize), up to the device's limit
SHARED_BUDGET = 64 * 1024       # preferred bytes per block (every sm_75+ device opts in this far); the default limit
CHUNK_THRESHOLD = 96            # i-variable components beyond which Sum nodes are chunked
CHUNK = 32                      # components per chunk


@dataclass(frozen=True)
class Program:
    """A generated CUDA module and what its launcher needs to know."""
    source: str
    block: int                  # threads per block = columns per tile
    shared_bytes: int           # dynamic shared memory per block
    slots: tuple[Slot, ...]     # the reduction state, in `engine.reductions` layout order
    outputs: tuple[tuple[str, int], ...]
    storage: str                # "float16" | "float32" | "float64": the dtype of inputs and value outputs
    acc: str                    # accumulator dtype name
    chunked: bool
    signatures: dict            # kernel name -> its C parameter declarations, in order
    column_bytes: int = 0       # bytes of one column of the staged j-tile (its stride may pad them)

    def dtype_of(self, kind: str) -> np.dtype:
        """The numpy dtype of a buffer kind (see `Buffer`)."""
        return np.dtype({"store": self.storage, "index": "int64", "acc": self.acc, "real": REAL[self.storage]}[kind])

    def state_bytes_per_row(self) -> int:
        return sum(slot.width * self.dtype_of(NUMPY_STATE[slot.ctype]).itemsize for slot in self.slots)


def build(plan: Plan, dtype, acc, shared_limit: int = SHARED_BUDGET) -> Program:
    """The CUDA module for `plan` on inputs of `dtype` with accumulator dtype `acc`, using at most `shared_limit`
    bytes of shared memory per block (the device's opt-in maximum; see "Shared memory" above)."""
    storage = np.dtype(dtype).name
    if storage not in STORAGE:
        raise BackendError(f"the CUDA backend computes in float16, float32 or float64, not {storage}")
    acc = np.dtype(acc).name
    real = REAL[storage]
    if np.dtype(acc).itemsize < np.dtype(real).itemsize:
        acc = real
    return _Generator(plan, storage, real, acc, shared_limit).program()


# The generator ----------------------------------------------------------------------------------------------

# KRED_EMULATION is defined only by the CPU emulation that CI uses to run these kernels without a GPU
# (tests/cuda_emulation.py); NVRTC always takes the CUDA branch.
_HALF = r"""
typedef unsigned short kred_half;
#ifndef KRED_EMULATION
#define KRED_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
KRED_FN float kred_half_to_float(kred_half h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
KRED_FN kred_half kred_float_to_half(float f) { kred_half h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#else
KRED_FN float kred_half_to_float(kred_half h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
KRED_FN kred_half kred_float_to_half(float f) { _Float16 v = (_Float16)f; kred_half h; memcpy(&h, &v, 2); return h; }
#endif
"""

# Inside tile code, the reduction steps run on the real type (see "Accumulation" above).
_ALIAS_ACC = """#pragma push_macro("KRED_ACC_INF")
#undef KRED_ACC_INF
#define KRED_ACC_INF KRED_INF
#define kred_acc kred_real
#define kred_acc_exp kred_exp
#define kred_acc_log kred_log
#define kred_acc_max kred_max"""
_UNALIAS_ACC = """#undef kred_acc
#undef kred_acc_exp
#undef kred_acc_log
#undef kred_acc_max
#pragma pop_macro("KRED_ACC_INF")"""


class _Generator:
    def __init__(self, plan: Plan, storage: str, real: str, acc: str, shared_limit: int):
        self.plan, self.storage, self.real, self.acc = plan, storage, real, acc
        self.reduction = plan.reduction
        self.slots = tuple(self.reduction.slots())
        self.roots = [plan.formula] + ([plan.formula2] if plan.formula2 is not None else [])
        if plan.fast_math and real == "float32":
            self.roots = [affine.hoist_factors(root) for root in self.roots]
        self.args = plan.args
        self.real_size = np.dtype(real).itemsize
        self.block_sums = acc != real and any(slot.ctype == "kred_acc" for slot in self.slots)
        self.i_components = sum(a.dim for a in self.args if a.role == I)
        self.chunks = _chunk_plan(self.roots) if self.i_components > CHUNK_THRESHOLD else []
        # use_fast_math in float32: dot-product forms and exp2 (see engine/codegen/affine.py)
        self.fast = plan.fast_math and real == "float32" and not self.chunks
        self.affine = self._affine_nodes() if self.fast else {}
        self._lay_out(shared_limit)

    def _lay_out(self, shared_limit: int) -> None:
        """The block size and the shared memory layout (see "Shared memory" in the module docstring).

        j-variables are staged per tile, interleaved per column ([y_0..y_D, b_0.., atoms] for column jj at jj *
        stride), so a column's values are contiguous and read with wide shared-memory loads; a variable read only
        through dot-product forms is not staged, its atoms (centred coordinates, norms) are; one read only inside
        chunked Sums is staged chunk by chunk. Then come the chunk staging area and the chunked partial sums."""
        used = self._tile_variables()
        staged = [(a.pos, a.dim) for a in self.args if a.role == J and a.pos in used]
        self.global_vars: dict[int, int] = {}       # j-variables read from global memory: pos -> dim
        self.chunk_vars = max((len(chunk.j_vars) for chunk in self.chunks), default=0)
        while True:
            self._lay_out_tile(staged)
            block = self._block_size(shared_limit)
            if block is not None:
                break
            if not staged:
                raise BackendError(f"this formula's {len(self.chunks)} chunked sums need more shared memory than the "
                                   f"device has ({shared_limit} bytes per block of {MIN_BLOCK}); use backend='cpu'")
            widest = max(staged, key=lambda var: var[1])
            staged.remove(widest)
            self.global_vars[widest[0]] = widest[1]
        self.block = block
        self.stage_offset = block * self.stride                          # chunk staging area
        self.chunk_offset = self.stage_offset + block * CHUNK * self.chunk_vars   # chunked partial sums
        self.shared_reals = self.chunk_offset + len(self.chunks) * block * block

    def _lay_out_tile(self, staged: list[tuple[int, int]]) -> None:
        self.tile_vars = list(staged)
        self.tile_offsets, width = {}, 0
        for pos, dim in self.tile_vars:
            self.tile_offsets[pos] = width
            width += dim
        self.atoms: dict[Node, int] = {}
        for form, _ in self.affine.values():
            for _, atom in form.terms:
                if atom not in self.atoms:
                    self.atoms[atom] = width
                    width += 1
        self.width, self.stride = width, _padded(width, 16 // self.real_size)

    def _shared_bytes(self, block: int) -> int:
        return (block * (self.stride + CHUNK * self.chunk_vars) + len(self.chunks) * block * block) * self.real_size

    def _block_size(self, shared_limit: int) -> int | None:
        """The largest block within SHARED_BUDGET, raised to PREFERRED_BLOCK where that fits the device (the chunked
        partial sums grow as block^2: a block of 32 threads leaves an SM one warp); else the largest block within the
        device's limit; None when none fits."""
        for limit in (min(SHARED_BUDGET, shared_limit), shared_limit):
            block = MAX_BLOCK
            while block > MIN_BLOCK and self._shared_bytes(block) > limit:
                block //= 2
            if self._shared_bytes(block) <= limit:
                if block < PREFERRED_BLOCK and self._shared_bytes(PREFERRED_BLOCK) <= shared_limit:
                    return PREFERRED_BLOCK
                return block
        return None

    def _affine_nodes(self) -> dict:
        """Scalar pair terms computed in dot-product form: node -> (affine form, through exp2). The outermost ones."""
        found: dict = {}
        log2e = affine.scale_factor(affine.LOG2E)

        def visit(node: Node) -> None:
            cats = depends_on(node)
            if node in found or J not in cats:
                return
            if node.op == "Exp" and node.dim == 1 and I in cats:
                forms = affine.decompose(node.children[0])
                if forms is not None:
                    found[node] = (affine.scale(forms[0], log2e), True)
                    return
            if node.dim == 1 and I in cats and affine.worthwhile(node):
                forms = affine.decompose(node)
                if forms is not None:
                    found[node] = (forms[0], False)
                    return
            for child in node.children:
                visit(child)

        for root in self.roots:
            visit(root)
        return found

    def _tile_variables(self) -> set[int]:
        """Positions of the j-variables the pair loop reads from the staged tile: not through an affine node, nor
        as the full-dimension operands of a chunked Sum (staged chunk by chunk); dim-1 operands of one are."""
        used, seen = set(), set()
        chunked = {chunk.node: chunk for chunk in self.chunks}
        stack = list(self.roots)
        while stack:
            node = stack.pop()
            if node in seen or node in self.affine:
                continue
            seen.add(node)
            if node in chunked:
                chunk = chunked[node]
                # broadcast dim-1 operands are read from the tile; the chunked ones (one component each, a 4th
                # parameter: see _scalar_body) are staged chunk by chunk, never whole
                used.update(n.params[0] for n in chunk.term.postorder()
                            if n.op == "Var" and n.params[2] == J and len(n.params) == 3)
                continue
            if node.op == "Var" and node.params[2] == J:
                used.add(node.params[0])
            stack.extend(node.children)
        return used

    # Source -------------------------------------------------------------------------------------------------
    def program(self) -> Program:
        self.signatures: dict[str, list[str]] = {}
        parts = [f"/* kred CUDA module: {self.reduction.name}, {self.storage} in, {self.acc} accumulator, "
                 f"{self.block} threads per block */",
                 "#define KRED_FAST_EXP 1" if self.fast else "", prelude("cuda", self.real, self.acc), _HALF,
                 self._storage_macros(),
                 self._reduce_kernel("kred_final", final=True), self._reduce_kernel("kred_state", final=False),
                 self._merge_kernel("kred_merge_final", final=True),
                 self._merge_kernel("kred_merge_state", final=False),
                 self._reduce_kernel("kred_grid_final", final=True, grid=True),
                 self._reduce_kernel("kred_grid_state", final=False, grid=True)]
        return Program("\n".join(parts), self.block, self.shared_reals * self.real_size, self.slots,
                       tuple(self.reduction.outputs), self.storage, self.acc, bool(self.chunks), self.signatures,
                       self.width * self.real_size)

    def _storage_macros(self) -> str:
        store = STORAGE[self.storage]
        if self.storage == "float16":
            load, save = "kred_half_to_float(x)", "kred_float_to_half(x)"
        else:
            load, save = "((kred_real)(x))", f"(({store})(x))"
        return (f"typedef {store} kred_store;\n#define KRED_LOAD(x) {load}\n#define KRED_SAVE(x) {save}\n")

    def _params(self) -> list[str]:
        return [f"const kred_store* __restrict__ arg{a.pos}" for a in self.args]

    def _out_params(self) -> list[str]:
        return [f"{'kred_store' if kind == 'value' else 'kred_index'}* __restrict__ out{o}"
                for o, (kind, _) in enumerate(self.reduction.outputs)]

    def _state_params(self, prefix: str, const: bool) -> list[str]:
        q = "const " if const else ""
        return [f"{q}{slot.ctype}* __restrict__ {prefix}{s}" for s, slot in enumerate(self.slots)]

    def _declare_state(self, prefix: str, ctype_of=None) -> list[str]:
        return [f"{ctype_of(slot) if ctype_of else slot.ctype} {prefix}{s}[{slot.width}];"
                for s, slot in enumerate(self.slots)]

    def _finish(self, state, final: bool, row: str, indent: str) -> list[str]:
        """Write a state (accessor `state`) at row `row` (a C expression): finalized outputs, or the state itself."""
        lines = []
        if final:
            outputs = self.reduction.outputs
            for o, (kind, width) in enumerate(outputs):
                ctype = "kred_real" if kind == "value" else "kred_index"
                lines.append(f"{ctype} fin{o}[{width}];")
            lines += self.reduction.c_finalize(state, lambda o, c: f"fin{o}[{c}]")
            for o, (kind, width) in enumerate(outputs):
                value = "KRED_SAVE(fin{o}[c])".format(o=o) if kind == "value" else f"fin{o}[c]"
                lines.append(f"for (int c = 0; c < {width}; c++) out{o}[{row} * {width} + c] = {value};")
        else:
            for s, slot in enumerate(self.slots):
                lines.append(f"for (int c = 0; c < {slot.width}; c++) "
                             f"state{s}[{row} * {slot.width} + c] = {state(s, 'c')};")
        return [indent + line for line in lines]

    def _reduce_kernel(self, name: str, final: bool, grid: bool = False) -> str:
        """kred_final / kred_state (rows r0 + blockIdx.x * block .., columns of span blockIdx.y), or with `grid` the
        block-sparse kred_grid_final / kred_grid_state: block u reduces the rows [i0, i1) (at most `block`) of unit u
        = units[4u .. 4u + 3] = (i0, i1, o0, o1) over its column ranges ranges[2o], ranges[2o + 1] for o in [o0, o1)
        (the grid's CSR pattern, engine.grid), one range after the other through the same shared-memory tiles."""
        if grid:
            params = ["const long long r0", "const long long c0", "const long long c1",
                      "const long long* __restrict__ units", "const long long* __restrict__ ranges"] + self._params()
        else:
            params = ["const long long r0", "const long long rows", "const long long c0", "const long long c1",
                      "const long long span"] + self._params()
        params += self._out_params() if final else self._state_params("state", const=False)
        running = (lambda s, c: f"s{s}[{c}]")
        tile = (lambda s, c: f"t{s}[{c}]") if self.block_sums else running
        body = ["KRED_SHARED_MEMORY(kred_shared);", "kred_real* const tile = (kred_real*)kred_shared;"]
        if grid:
            body += [
                "const long long unit = 4 * (long long)blockIdx.x;     /* 64-bit: 2^30 units and more */",
                "const long long i0 = units[unit], i1 = units[unit + 1], o0 = units[unit + 2], o1 = units[unit + 3];",
                "const long long row = i0 - r0 + threadIdx.x;",
                "const int active = i0 + threadIdx.x < i1;",
                "const long long i = active ? i0 + threadIdx.x : i0;   /* idle threads still help stage tiles */",
                "long long first = KRED_NO_INDEX;     /* the lowest column the unit reduces (Reduction.c_start) */",
                "for (long long o = o0; o < o1; o++)",
                "    if (ranges[2 * o] < ranges[2 * o + 1] && ranges[2 * o] < first) first = ranges[2 * o];",
            ]
        else:
            body += [
                f"const long long row = (long long)blockIdx.x * {self.block} + threadIdx.x;",
                "const int active = row < rows;",
                "const long long i = r0 + (active ? row : 0);   /* idle threads still help stage tiles */",
                "const long long jbegin = c0 + (long long)blockIdx.y * span;",
                "const long long jend = jbegin + span < c1 ? jbegin + span : c1;",
                "const long long first = jbegin < jend ? jbegin : KRED_NO_INDEX;",
            ]
        body += self._centre_lines("i0" if grid else f"r0 + (long long)blockIdx.x * {self.block}")
        hoisted, loop_emitter = self._hoist()
        body += hoisted
        body += self._declare_state("s")
        body += self.reduction.c_init(running) + self.reduction.c_start(running, "first")
        loop = [f"for (long long jt = jbegin; jt < jend; jt += {self.block}) {{",
                f"    const int count = (int)(jend - jt < {self.block} ? jend - jt : {self.block});",
                "    __syncthreads();"]
        for pos, dim in self.tile_vars:         # coalesced reads of the tile's contiguous span of each variable
            loop += [f"    for (int e = threadIdx.x; e < count * {dim}; e += {self.block}) {{",
                     f"        const int column = e / {dim};",
                     f"        tile[column * {self.stride} + {self.tile_offsets[pos]} + e - column * {dim}] = "
                     f"KRED_LOAD(arg{pos}[jt * {dim} + e]);",
                     "    }"]
        loop += ["    " + line for line in self._stage_atoms()]
        loop.append("    __syncthreads();")
        loop += ["    " + line for line in self._chunk_pass()]
        loop.append("    if (active) {")
        inner = []
        if self.block_sums:
            inner.append(_ALIAS_ACC)
            inner += self._declare_state("t", lambda slot: "kred_real" if slot.ctype == "kred_acc" else slot.ctype)
            inner += self.reduction.c_init(tile) + self.reduction.c_start(tile, "jt")
        inner.append("for (int jj = 0; jj < count; jj++) {")
        values = [loop_emitter.emit(root) for root in self.roots]
        inner += ["    " + line for line in loop_emitter.lines]
        inner += ["    " + line for line in self.reduction.c_accumulate(tile, values[0],
                                                             values[1] if len(values) > 1 else None, "jt + jj")]
        inner.append("}")
        if self.block_sums:
            inner.append(_UNALIAS_ACC)
            inner += self.reduction.c_merge(running, tile)
        loop += ["        " + line for line in inner]
        loop += ["    }", "}"]
        if grid:        # every thread of the block meets the same ranges, so the barriers stay uniform
            body += ["for (long long o = o0; o < o1; o++) {",
                     "    const long long jbegin = ranges[2 * o], jend = ranges[2 * o + 1];"]
            body += ["    " + line for line in loop] + ["}"]
        else:
            body += loop
        body.append("if (!active) return;")
        at = "row" if final or grid else "((long long)blockIdx.y * rows + row)"
        body += self._finish(running, final, at, "")
        return self._kernel(name, params, body)

    def _merge_kernel(self, name: str, final: bool) -> str:
        params = ["const long long rows", "const int splits"] + self._state_params("part", const=True)
        params += self._out_params() if final else self._state_params("state", const=False)
        into, other = (lambda s, c: f"a{s}[{c}]"), (lambda s, c: f"b{s}[{c}]")
        body = ["const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
                "if (row >= rows) return;"]
        body += self._declare_state("a") + self._declare_state("b")
        for s, slot in enumerate(self.slots):
            body.append(f"for (int c = 0; c < {slot.width}; c++) a{s}[c] = part{s}[row * {slot.width} + c];")
        body.append("for (int split = 1; split < splits; split++) {")
        for s, slot in enumerate(self.slots):
            body.append(f"    for (int c = 0; c < {slot.width}; c++) "
                        f"b{s}[c] = part{s}[(split * rows + row) * {slot.width} + c];")
        body += ["    " + line for line in self.reduction.c_merge(into, other)]
        body.append("}")
        body += self._finish(into, final, "row", "")
        return self._kernel(name, params, body, bounds=False)

    def _kernel(self, name: str, params: list[str], body: list[str], bounds: bool = True) -> str:
        self.signatures[name] = params
        launch = f"__launch_bounds__({self.block}) " if bounds else ""
        head = f'extern "C" __global__ void {launch}{name}(\n    ' + ",\n    ".join(params) + ")\n{"
        lines = [line.lstrip() if _directive(line) else "    " + line for text in body for line in text.split("\n")]
        return head + "\n" + "\n".join(lines) + "\n}\n"

    # Formula body ---------------------------------------------------------------------------------------------
    def _load(self, node: Node, k: int) -> str:
        if len(node.params) == 5:           # a square's centre (affine.centre): computed once per block
            return self.centres[node]
        pos, dim, cat = node.params
        if cat == J and pos in self.global_vars:
            return f"KRED_LOAD(arg{pos}[(jt + jj) * {dim} + {k}])"
        if cat == J:
            return f"tile[jj * {self.stride} + {self.tile_offsets[pos] + k}]"
        if cat == I:
            return f"KRED_LOAD(arg{pos}[i * {dim} + {k}])"
        return f"KRED_LOAD(__ldg(&arg{pos}[{k}]))" if self.storage != "float16" else f"KRED_LOAD(arg{pos}[{k}])"

    def _centre_lines(self, first_row: str) -> list[str]:
        """The centres of the dot-product forms' squares (engine/codegen/affine.py): their row side at the block's
        first row `first_row`, one register each, shared by the block's threads."""
        self.centres: dict[Node, str] = {}
        nodes = list(dict.fromkeys(n for form, _ in self.affine.values()
                                   for part in [form.const] + [x for term in form.terms for x in term]
                                   if part is not None
                                   for n in part.postorder() if n.op == "Var" and len(n.params) == 5))
        if not nodes:
            return []

        def load(node: Node, k: int) -> str:
            if node.params[2] == I:
                return f"KRED_LOAD(arg{node.params[0]}[kred_first * {node.params[1]} + {k}])"
            return self._load(node, k)

        emitter = Emitter(load, prefix="kc")
        values = {node: emitter.emit(node.params[4])[0] for node in nodes}
        lines = [f"const long long kred_first = {first_row};     /* the centres' row: the block's first */"]
        lines += emitter.lines
        for k, (node, value) in enumerate(values.items()):
            lines.append(f"const kred_real kred_centre{k} = {value};")
            self.centres[node] = f"kred_centre{k}"
        return lines

    def _hoist(self) -> tuple[list[str], Emitter]:
        """Registers for the i- and parameter-only part of the formula; an emitter for the per-column part."""
        chunked = {chunk.node for chunk in self.chunks}
        hoist = Emitter(self._load, prefix="h")
        lines: list[str] = []
        if not self.chunks:
            # copy small i-variables and parameters into registers once (a Var's components are loads, not values)
            for a in self.args:
                if a.role != J:
                    names = [f"x{a.pos}_{k}" for k in range(a.dim)]
                    lines += [f"const kred_real {n} = {self._load(_var(a), k)};" for k, n in enumerate(names)]
                    hoist.values[_var(a)] = names
        for root in self.roots:
            for node in root.postorder():
                if node in hoist.values or J in depends_on(node) or node.op == "Var" and self.chunks:
                    continue
                if any(node in c.node.postorder() for c in self.chunks) and node not in chunked:
                    continue            # parts of chunked sums are computed chunk by chunk
                hoist.emit(node)
        tile_values: dict[Node, list[str]] = {}
        for node, (form, exp2) in self.affine.items():
            value = hoist.emit(form.const)[0] if form.const is not None else "((kred_real)0)"
            for coef, atom in form.terms:
                staged = f"tile[jj * {self.stride} + {self.atoms[atom]}]"
                value = f"({hoist.emit(coef)[0]} * {staged} + {value})" if coef is not None else \
                    f"({staged} + {value})"
            tile_values[node] = [f"kred_exp2_f32({value})" if exp2 else value]
        lines += hoist.lines
        known = dict(hoist.values)
        known.update(tile_values)
        for index, chunk in enumerate(self.chunks):
            known[chunk.node] = [f"tile[{self.chunk_offset + index * self.block * self.block} + "
                                 f"jj * {self.block} + threadIdx.x]"]
        return lines, Emitter(self._load, prefix="v", known=known)

    def _stage_atoms(self) -> list[str]:
        """Each column's atoms of the dot-product forms (centred coordinates, norms), computed once per column."""
        if not self.atoms:
            return []

        def load(node: Node, k: int) -> str:
            if len(node.params) == 3 and node.params[2] == J:
                return f"KRED_LOAD(arg{node.params[0]}[(jt + column) * {node.params[1]} + {k}])"
            return self._load(node, k)

        emitter = Emitter(load, prefix="g")
        values = [(emitter.emit(atom)[0], offset) for atom, offset in self.atoms.items()]
        return ([f"for (int column = threadIdx.x; column < count; column += {self.block}) {{"]
                + ["    " + line for line in emitter.lines]
                + [f"    tile[column * {self.stride} + {offset}] = {value};" for value, offset in values] + ["}"])

    def _chunk_pass(self) -> list[str]:
        """Partial sums of the chunked nodes for every column of the tile (see `_chunk_plan`): a loop over the
        full chunks of `CHUNK` components, then the remaining components, each unrolled without bounds tests."""
        lines: list[str] = []
        for index, chunk in enumerate(self.chunks):
            base = self.chunk_offset + index * self.block * self.block
            lines.append(f"for (int jj = 0; jj < count; jj++) tile[{base} + jj * {self.block} + threadIdx.x] = 0;")
            full, rest = chunk.dim - chunk.dim % CHUNK, chunk.dim % CHUNK
            if full:
                lines.append(f"for (int k0 = 0; k0 < {full}; k0 += {CHUNK}) {{")
                lines += ["    " + line for line in self._chunk_block(chunk, base, CHUNK)]
                lines.append("}")
            if rest:
                lines.append("{")
                lines.append(f"    const int k0 = {full};")
                lines += ["    " + line for line in self._chunk_block(chunk, base, rest)]
                lines.append("}")
        return lines

    def _chunk_block(self, chunk, base: int, width: int) -> list[str]:
        """Components [k0, k0 + width) of a chunked Sum, for every column of the tile: that chunk of its j-variables
        staged by the whole block (every thread runs the chunk pass, so the barriers are reached by all), that
        chunk of its i-variables in registers."""
        lines = ["__syncthreads();          /* the staging area is free: the previous chunk is read */"]
        for v, (pos, dim) in enumerate(chunk.j_vars):
            lines += [f"for (int e = threadIdx.x; e < count * {width}; e += {self.block}) {{",
                      f"    const int column = e / {width};",
                      f"    tile[{self.stage_offset} + column * {CHUNK * self.chunk_vars} + {v * CHUNK} + e - column * "
                      f"{width}] = KRED_LOAD(arg{pos}[(jt + column) * {dim} + k0 + e - column * {width}]);",
                      "}"]
        lines.append("__syncthreads();")
        for pos, dim in chunk.i_vars:         # this chunk of each i-variable, in registers
            lines.append(f"kred_real xchunk{pos}[{width}];")       # (c0, c1 are kernel parameters)
            lines.append(f"#pragma unroll\nfor (int k = 0; k < {width}; k++) "
                         f"xchunk{pos}[k] = {self._chunk_load(pos, dim, cat=I, k='k0 + k')};")
        lines.append("for (int jj = 0; jj < count; jj++) {")
        lines.append("    kred_real acc = 0;")
        lines.append(f"    #pragma unroll\n    for (int k = 0; k < {width}; k++) {{")
        emitter = Emitter(lambda node, k: self._chunk_var(node, chunk), prefix="w")
        (term,) = emitter.emit(chunk.term)
        lines += ["        " + line for line in emitter.lines]
        lines.append(f"        acc += {term};")
        lines += ["    }", f"    tile[{base} + jj * {self.block} + threadIdx.x] += acc;", "}"]
        return lines

    def _chunk_load(self, pos: int, dim: int, cat: int, k: str) -> str:
        if cat == I:
            return f"KRED_LOAD(arg{pos}[i * {dim} + {k}])"
        return f"KRED_LOAD(arg{pos}[{k}])"

    def _chunk_var(self, node: Node, chunk) -> str:
        pos, dim, cat = node.params[:3]
        if len(node.params) == 3:          # broadcast operands of the elementwise chunk body
            return self._load(node, 0)
        if cat == I:
            return f"xchunk{pos}[k]"
        if cat == J:
            v = [p for p, _ in chunk.j_vars].index(pos)
            return f"tile[{self.stage_offset} + jj * {CHUNK * self.chunk_vars} + {v * CHUNK} + k]"
        return f"KRED_LOAD(arg{pos}[k0 + k])"


def _padded(width: int, vector: int) -> int:
    """A column stride that keeps columns aligned for wide loads: up to the next power of two below `vector`
    reals (3 -> 4), else to a multiple of `vector` (5 -> 8 in float32)."""
    unit = 1
    while unit < min(width, vector):
        unit *= 2
    return -(-width // unit) * unit


def _directive(line: str) -> bool:
    """Preprocessor lines start at column 0 (except `#pragma unroll`, which belongs to the loop below it)."""
    text = line.lstrip()
    return text.startswith("#") and not text.startswith("#pragma unroll")


def _var(spec) -> Node:
    return make("Var", (), (spec.pos, spec.dim, spec.role))


# Chunking of large Sum nodes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Chunk:
    node: Node                          # the Sum node replaced by its chunked value
    term: Node                          # its operand, evaluated one component at a time
    dim: int
    i_vars: tuple[tuple[int, int], ...]  # (pos, dim) of the i-variables it reads, component by component
    j_vars: tuple[tuple[int, int], ...]  # the same for j-variables (staged chunk by chunk)


_ELEMENTWISE_LEAVES = ("Var", "IntCst", "Const")


def _chunk_plan(roots: list[Node]) -> list[_Chunk]:
    """The Sum nodes over large elementwise expressions of i and j variables, to be evaluated chunk by chunk.

    Such a node's operand computes component k from component k of its operands (dim-1 operands broadcast), so it
    can be evaluated for one component at a time with the component index as a loop variable.
    """
    from ..formula.ops import OPS

    found: dict[Node, _Chunk] = {}
    for root in roots:
        for node in root.postorder():
            if node.op != "Sum" or node in found or node.children[0].dim < CHUNK:
                continue
            term = node.children[0]
            inner = term.postorder()
            if not all(n.op in _ELEMENTWISE_LEAVES or OPS[n.op].c is not None for n in inner):   # per-component ops
                continue
            if not {I, J} <= depends_on(term):
                continue
            if any(n.op == "Var" and n.dim not in (1, term.dim) for n in inner):
                continue
            i_vars, j_vars = (tuple(sorted({(n.params[0], n.params[1]) for n in inner
                                            if n.op == "Var" and n.params[2] == cat and n.dim > 1})) for cat in (I, J))
            found[node] = _Chunk(node, _scalar_body(term), term.dim, i_vars, j_vars)
    return list(found.values())


def _scalar_body(term: Node) -> Node:
    """The operand of a chunked Sum with every variable of the Sum's dimension made scalar: the emitter then writes
    one component, and `_chunk_var` reads component `k0 + k` of each variable."""
    dim = term.dim
    done: dict[Node, Node] = {}
    for n in term.postorder():
        if n.op == "Var":
            pos, vdim, cat = n.params
            # a distinct node (params are the hash-consing key): one component of the variable
            done[n] = Node("Var", (), (pos, vdim, cat, "component"), 1) if vdim == dim else n
        elif n.op in ("IntCst", "Const"):
            done[n] = n
        else:
            done[n] = Node(n.op, tuple(done[c] for c in n.children), n.params, 1)
    return done[term]
