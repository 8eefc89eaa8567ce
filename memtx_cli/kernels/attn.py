"""bfloat16 attention on AVX512-BF16 CPUs: the Python face of attn.c.

On a CPU with AVX512-BF16 alone, torch's CPU flash kernel runs bfloat16 at its float32 speed;
attn.c does both products on the CPU's bfloat16 dot-product unit. On a CPU with AMX, torch's
oneDNN kernels reach the tile unit and win the dense products (attention, block maxima), while
the gathering reads (block_attention, far_attention) stay faster here. So where torch has an
equivalent, `preferred` decides by timing both once per process (timings: docs/decisions.md,
`benchmarks/attn_kernel_timing.py`). build.py compiles and loads attn.c. Whenever it cannot be
used (no compiler, a CPU without AVX512-BF16, not Linux, MEMTX_KERNEL=0) each function here
returns None (or False) and the caller uses torch's kernel: results agree to bfloat16 rounding.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from memtx_cli.kernels.build import enabled, load

__all__ = [
    "enabled",
    "load",
    "preferred",
    "attention",
    "block_max",
    "block_max_torch",
    "block_pick",
    "pack_rows",
    "far_attention",
    "block_attention",
]

HEAD_DIM = 64  # the kernel's only head size (SmolLM2, Llama-style small models)


def _run(name: str, *args: object) -> None:
    """Call memtx_<name> on torch's thread count, visible to torch.profiler as
    memtx::attn_kernel.<name> (a ctypes call is not otherwise)."""
    lib = load()
    assert lib is not None
    fn = getattr(lib, f"memtx_{name}")
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"memtx::attn_kernel.{name}"):
            rc = fn(*args, torch.get_num_threads())
    else:  # the label costs ~25 us a call (~3 ms per segment with memory in 23 layers)
        rc = fn(*args, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"attn_kernel.{name}: out of memory")


def usable(*xs: torch.Tensor) -> bool:
    """Whether `attention` runs for these q, k, v: CPU, bfloat16, head dim 64, no autograd."""
    return (
        all(x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[-1] == HEAD_DIM for x in xs)
        and not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))
        and enabled()
        and load() is not None
    )


_WINS: dict[str, bool] = {}


def preferred(op: str) -> bool:
    """Whether callers should run the kernel's `op` ("attention", "block_max" or "linear") rather than
    torch's equivalent: MEMTX_KERNEL=1 always (where it runs), 0 never; otherwise the faster of
    the two on this CPU, timed once per process on a shape scoring uses (a few ms)."""
    mode = os.environ.get("MEMTX_KERNEL", "auto")
    if mode == "0" or load() is None:
        return False
    if mode == "1":
        return True
    if op not in _WINS:
        _WINS[op] = _kernel_wins(op)
    return _WINS[op]


def _median_times(fns: list[Callable[[], object]], reps: int = 5) -> list[float]:
    """Median seconds per call of each function, after one warm-up call each, calls interleaved."""
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(x) for x in times]


def _kernel_wins(op: str) -> bool:
    """Time the kernel's `op` against torch's on random inputs of one scoring shape: one layer's
    local attention in a 512-token segment (3 KV heads, their 3 query heads folded, 1,024 keys),
    or the block maxima of 96 voters over 7,616 keys of 3 heads."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    with torch.inference_mode():
        if op == "attention":
            q, k, v = rand(3, 1536, 64), rand(3, 1024, 64), rand(3, 1024, 64)
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            ours, theirs = _median_times(
                [
                    lambda: attention(q, k, v, None, 0.125),
                    lambda: flash(q[None], k[None], v[None], 0.0, False, scale=0.125),
                ]
            )
        elif op == "block_max":
            keys, voters = rand(3, 7616, 64), rand(3, 96, 64)
            ours, theirs = _median_times(
                [lambda: block_max(keys, voters, 32, 7616), lambda: block_max_torch(keys, voters, 32, 7616)]
            )
        elif op == "linear":
            from memtx_cli.kernels import linear  # it builds on this module

            return linear.kernel_wins()
        else:
            raise ValueError(f"no timing for kernel op {op!r}")
    return ours <= theirs


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) with each batch's rows contiguous (any batch stride)."""
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return x


def attention(
    q: torch.Tensor,  # (B, M, 64) bfloat16
    k: torch.Tensor,  # (B, S, 64)
    v: torch.Tensor,  # (B, S, 64)
    bias: torch.Tensor | None,  # (B, S) added to the scaled scores (-inf masks), or None
    scale: float,
    causal_t: int = 0,  # > 0: row i sees keys j <= S - causal_t + i % causal_t
    init: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, M, 64) bfloat16, (B, M) float32
) -> tuple[torch.Tensor, torch.Tensor] | None:  # (B, M, 64) bfloat16, (B, M) float32
    """Softmax attention and its log-sum-exp (natural log of the sum of e^score); a row that
    sees no key gets output 0 and lse -inf. init: each row's attention over other keys (output,
    lse; -inf: none) to continue from: the result is then the attention over both (the merge
    by log-sum-exp, done in the kernel's online softmax). None when the kernel cannot run (see
    `usable`)."""
    if not usable(q, k, v):
        return None
    b, m, d = q.shape
    s = k.shape[1]
    if b == 0 or m == 0 or s == 0:  # nothing to attend to (or with): out 0, lse -inf (or init)
        if init is not None:
            return init[0].to(torch.bfloat16), init[1].to(torch.float32)
        return torch.zeros(b, m, d, dtype=torch.bfloat16), torch.full((b, m), float("-inf"))
    q, k, v = _rows(q), _rows(k), _rows(v)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
        assert bias.shape == (b, s), bias.shape
    if init is not None:
        o0, l0 = init[0].to(torch.bfloat16).contiguous(), init[1].to(torch.float32).contiguous()
        assert o0.shape == (b, m, d) and l0.shape == (b, m), (o0.shape, l0.shape)
    out = torch.empty(b, m, d, dtype=torch.bfloat16)
    lse = torch.empty(b, m, dtype=torch.float32)
    _run(
        "attention",
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        b,
        m,
        s,
        q.stride(0) if b > 1 else 0,
        k.stride(0) if b > 1 else 0,
        v.stride(0) if b > 1 else 0,
        causal_t,
        scale,
        0 if init is None else o0.data_ptr(),
        0 if init is None else l0.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
    )
    return out, lse


def block_max(
    keys: torch.Tensor,  # (KV, N, 64) bfloat16, N a multiple of `block`
    voters: torch.Tensor,  # (KV, Qn, 64) bfloat16, Qn <= 256
    block: int,  # keys per block, a multiple of 8
    n_valid: int,  # keys from n_valid on are not scored (the last block's unused tail)
) -> torch.Tensor | None:  # (KV, N // block, Qn) float32
    """Each block's best exact logit per voter: max over its valid keys of key . voter, -inf for
    a block with none; float32 products, never materialising the (N, Qn) logits. None when the
    kernel cannot run (see `usable`) or the shapes do not fit it."""
    kv, n, d = keys.shape
    qn = voters.shape[1]
    if not usable(keys, voters) or n % block or block % 8 or qn > 256 or qn == 0 or n == 0:
        return None
    keys, voters = _rows(keys), _rows(voters)
    out = torch.empty(kv, n // block, qn, dtype=torch.float32)
    _run(
        "block_max",
        keys.data_ptr(),
        voters.data_ptr(),
        kv,
        n,
        qn,
        keys.stride(0) if kv > 1 else 0,
        voters.stride(0) if kv > 1 else 0,
        block,
        n_valid,
        out.data_ptr(),
    )
    return out


def block_max_torch(keys: torch.Tensor, voters: torch.Tensor, block: int, n_valid: int) -> torch.Tensor:
    """`block_max` in torch ops: one matmul per head in the keys' dtype (keys as the row operand,
    their natural layout), the maxima in float32 (bfloat16's amax is slower)."""
    kv, n, _ = keys.shape
    logits = (keys @ voters.transpose(-1, -2)).float()  # (KV, N, Qn)
    if n_valid < n:
        logits[:, max(n_valid, 0) :] = float("-inf")
    return logits.view(kv, n // block, block, -1).amax(2)


def block_pick(
    best: torch.Tensor,  # (KV, nbn, C*Q) float32: block_max of the chunks' voters
    near: torch.Tensor,  # (C, nbn) bool: which of those blocks each chunk reads
    voters: torch.Tensor,  # (KV, C*Q, 64) bfloat16: a zero row is no voter
    lo: int,  # entries before the first of the nbn blocks (relevance -inf)
    spread: int,
    m: int,
    first: int,  # block id of entry 0
) -> tuple[torch.Tensor, torch.Tensor] | None:  # (KV, C, m') int64 block ids, float32 relevance
    """Near-block selection from the voters' block maxima: each voter's softmax over the
    chunk's near blocks, summed over voters, log (floor 1e-30), spread over the `spread` blocks
    after, the best m' = min(m, lo + nbn) entries best first (ties: the later block). What
    LayerMemory._exact_relevance + spread_forward + top_blocks compute in ~20 torch ops. None
    when the kernel cannot run."""
    kv, nbn, cq = best.shape
    c = near.shape[0]
    if not usable(voters) or best.dtype != torch.float32 or cq % c or voters.shape[1] != cq or nbn == 0:
        return None
    if cq // c > 16:  # the kernel holds a chunk's voters in one vector (--block-votes 5 or less with G = 3)
        return None
    best, voters = best.contiguous(), _rows(voters)
    near = near.to(torch.uint8).contiguous()
    mm = min(m, lo + nbn)
    pick = torch.empty(kv, c, mm, dtype=torch.int64)
    score = torch.empty(kv, c, mm, dtype=torch.float32)
    _run(
        "block_pick",
        best.data_ptr(),
        near.data_ptr(),
        voters.data_ptr(),
        kv,
        c,
        cq // c,
        nbn,
        lo,
        voters.stride(0) if kv > 1 else 0,
        spread,
        m,
        first,
        pick.data_ptr(),
        score.data_ptr(),
    )
    return pick, score


def pack_rows(k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> bool:
    """Keys and values k, v (KV, n, 64) bfloat16 (n a multiple of 32, rows contiguous) packed into
    pk, pv (KV, n * 64 elements per head, contiguous per head, heads any stride apart) in the
    layout block_attention reads (`packed`). False where the kernel cannot run (nothing written)."""
    kv, n, _ = k.shape
    if not usable(k, v) or n % 32 or pk.dtype != torch.bfloat16 or pv.stride() != pk.stride():
        return False
    if k.stride(1) != HEAD_DIM or v.stride(1) != HEAD_DIM or k.stride(2) != 1 or v.stride(2) != 1:
        return False
    if pk[0].numel() != n * HEAD_DIM or not pk[0].is_contiguous() or not pv[0].is_contiguous():
        return False
    _run(
        "pack_rows",
        k.data_ptr(),
        v.data_ptr(),
        kv,
        n,
        k.stride(0),
        v.stride(0),
        pk.data_ptr(),
        pv.data_ptr(),
        pk.stride(0),
    )
    return True


def far_attention(
    keys: torch.Tensor,  # (N, 64) bfloat16, rows contiguous
    values: torch.Tensor,  # (N, 64) bfloat16
    qs: torch.Tensor,  # (T, 64) search vectors (any float dtype; searched in float32)
    qa: torch.Tensor,  # (G, T, 64) bfloat16 attention queries
    bound: torch.Tensor,  # (T,) int64: query i reads among rows 0..bound[i]-1
    k: int,
    scale: float,
    bias: float,
    with_ids: bool = False,
    pages: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:  # (G, T, 64) f32, (G, T) f32, (T, k)
    """Each query's own top k rows of keys by its search vector (a bfloat16 shortlist of 2k,
    rescored in float32: the exact top k whenever its bound is <= 2k), then attention of the G
    queries qa[:, i] over those k keys and their values, scores scale * q.k - bias in float32.
    Returns out, lse (-inf and 0 where a query has no rows) and, with_ids, the rows read (T, k)
    best first (-1 past the count). None when the kernel cannot run (see `usable`).

    pages = (kmin, kmax, block, n) (Quest, Tang et al. 2024): each run of 32 queries searches
    only the union of its queries' n best blocks of `block` rows (all of a query's blocks when
    it has no more), ranked per query by the bound sum_c max(q_c kmin_c, q_c kmax_c) >= q . k
    (kmin, kmax (blocks, 64) float32: each block's per-channel key minimum and maximum)."""
    t, g = qs.shape[0], qa.shape[0]
    if not usable(keys, values, qa) or qs.shape[-1] != HEAD_DIM or k <= 0 or qs.device.type != "cpu":
        return None
    kmin = kmax = None
    block = n_pages = 0
    if pages is not None:
        kmin, kmax, block, n_pages = pages
        if block % 8 or n_pages <= 0:
            return None
        nb = -(-int(bound.max()) // block) if t else 0
        kmin, kmax = kmin[:nb].float().contiguous(), kmax[:nb].float().contiguous()
    keys, values = _rows(keys[None])[0], _rows(values[None])[0]
    qs, qa = qs.float().contiguous(), qa.contiguous()
    bound = bound.to(torch.int64).clamp(0, keys.shape[0]).contiguous()
    out = torch.empty(g, t, HEAD_DIM, dtype=torch.float32)
    lse = torch.empty(g, t, dtype=torch.float32)
    ids = torch.empty(t, k, dtype=torch.int64) if with_ids else None
    if t == 0:
        return out, lse, ids
    _run(
        "far_attention",
        keys.data_ptr(),
        values.data_ptr(),
        qs.data_ptr(),
        qa.data_ptr(),
        bound.data_ptr(),
        t,
        g,
        k,
        2 * k,
        scale,
        bias,
        0 if kmin is None else kmin.data_ptr(),
        0 if kmax is None else kmax.data_ptr(),
        block,
        n_pages,
        out.data_ptr(),
        lse.data_ptr(),
        0 if ids is None else ids.data_ptr(),
    )
    return out, lse, ids


def block_attention(
    q: torch.Tensor,  # (B, M, 64) bfloat16
    kbuf: torch.Tensor,  # (KV, cap, 64) bfloat16 key buffer, rows contiguous
    vbuf: torch.Tensor,  # (KV, cap, 64) value buffer, the same layout
    heads: torch.Tensor,  # (B,) the head each batch reads
    blocks: torch.Tensor,  # (B, nbk) block ids (rows id * block .. + block - 1)
    ok: torch.Tensor | None,  # (B, nbk) bool: False masks the block, or None
    block: int,  # rows per block, a multiple of 32
    n_valid: int,  # rows from n_valid on are masked (the last block's unused tail)
    scale: float,
    ring: int = 0,  # > 0: the buffers are a ring of `ring` rows (row id in row id % ring)
    packed: tuple[torch.Tensor, torch.Tensor] | None = None,  # (KV, P, block * 64) keys, values
) -> tuple[torch.Tensor, torch.Tensor] | None:  # (B, M, 64) bfloat16, (B, M) float32
    """`attention` over memory blocks read where they are: no (B, nbk * block, 64) gather of
    keys and values and no mask tensor (masked keys are the tail past n_valid and blocks not ok).
    packed: the same blocks already in the kernel's layout (LayerMemory.pk / pv: block i in slot
    i % P; every block read must be there), read instead of kbuf / vbuf with nothing packed.
    A row that sees no key gets 0 and -inf. None when the kernel cannot run (see `usable`) or the
    shapes do not fit it."""
    b, m, _ = q.shape
    nbk = blocks.shape[1]
    if not usable(q, kbuf, vbuf) or block % 32 or kbuf.shape != vbuf.shape or b == 0 or m == 0 or nbk == 0:
        return None
    if kbuf.stride() != vbuf.stride() or kbuf.stride(1) != HEAD_DIM or kbuf.stride(2) != 1:
        return None
    if packed is not None and not all(
        x.is_contiguous() and x.dtype == torch.bfloat16 and x.shape[2] == block * HEAD_DIM for x in packed
    ):
        return None
    q = _rows(q)
    heads, blocks = heads.to(torch.int64).contiguous(), blocks.to(torch.int64).contiguous()
    ok = None if ok is None else ok.to(torch.uint8).contiguous()
    out = torch.empty(b, m, HEAD_DIM, dtype=torch.bfloat16)
    lse = torch.empty(b, m, dtype=torch.float32)
    _run(
        "block_attention",
        q.data_ptr(),
        kbuf.data_ptr(),
        vbuf.data_ptr(),
        heads.data_ptr(),
        blocks.data_ptr(),
        0 if ok is None else ok.data_ptr(),
        b,
        m,
        nbk,
        block,
        kbuf.stride(0) // HEAD_DIM,
        ring // block,
        n_valid,
        q.stride(0) if b > 1 else 0,
        scale,
        0 if packed is None else packed[0].data_ptr(),
        0 if packed is None else packed[1].data_ptr(),
        0 if packed is None else packed[0].shape[1],
        out.data_ptr(),
        lse.data_ptr(),
    )
    return out, lse
