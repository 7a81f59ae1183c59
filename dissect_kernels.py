"""CLIP-Dissect similarity functions: NumPy in, NumPy out, one K x M float32 score matrix.

CLIP-Dissect (paper 001) Sec. 3.2 and App. A.1; SPEC.md section 3. Every function takes

    A  (N x K, float32)  activations: column k is the neuron's vector q_k over the N probe images
    P  (N x M, float32)  concept activations: P[i, m] = cos(CLIP image i, CLIP text m)

and returns S (K x M, float32; WPMI and SoftWPMI give float64 on request) with
S[k, m] = sim(t_m, q_k; P); the label of neuron k is argmax_m S[k, m]. Usage::

    import dissect_kernels as dk
    S = dk.soft_wpmi(A, P, name="blocks.11.mlp")          # the paper's default similarity
    labels = S.argmax(axis=1)
    S = dk.SIMILARITIES["wpmi"](A, P, top_k=28)

Conventions shared by every function (document once, apply everywhere):

* Top images. "The top-k images of neuron k" are the k largest entries of q_k by *value* (a sparse
  LWTA unit whose winning responses are negative therefore ranks its zero, losing images above
  them, exactly as the equations say). Ties between equal activations are broken stably: the
  lower image index comes first (so it is selected first and gets the higher rank). When N < k
  all N images are used, with the ranks and weights they would have had.
* Dead neurons. A neuron whose activations are all zero has no example set; its row of scores is
  NaN in every function. In WPMI and SoftWPMI it is also left out of the normaliser
  log p(t_m) = logsumexp_j log p(t_m|B_j) - log |C| (App. A.1 Eq. 7, 13): C is the set of *live*
  neurons of the layer, so adding dead units never shifts the other neurons' scores.
* Input checks. NaN or inf in A or P raises ValueError naming the input and the layer (``name=``).
  Inputs of another float dtype are converted to float32; shapes must agree on N.
* Threads. ``n_threads`` sets Numba's thread count for the call only (None: Numba's default).
  The matrix products of cos / cos^3 run in NumPy's BLAS, which keeps its own thread setting.
* Memory. Beside the inputs and the K x M output, no function holds an N x M (or N x M x K) array.
  WPMI / SoftWPMI never materialise the softmax: a per-image normaliser (one N-vector) is computed
  once, then each thread holds p(t_m|x_i) for one block of 128 concepts over the images of the top
  lists (float32, at most N x 128: 25 MB at N = 50 000) and its K x 128 running products;
  cos^3 transforms P in column chunks of at most 64 MB; rank reorder sorts one concept at a time.
* Precision. Exponentials, p(t_m|x_i) and the running products are float32 (products renormalised
  before they can underflow); sums, logs and the normaliser over neurons are float64. Scores match
  a float64 transcription to ~1e-6 absolute (tests: 1e-4 relative, 1e-5 absolute floor).
  WPMI and SoftWPMI saturate: a concept that one neuron k dominates scores
  lam log(#live) - lam log(1 + r) with r = sum_{j != k} exp(L_j - L_k) tiny, and float32 (step
  ~5e-7 near log 64) rounds many such concepts to the same value, so argmax falls back to the lower
  concept index. ``dtype=np.float64`` returns the float64 scores, which still rank them as the
  equations do (``dissect`` asks for it; on the world's fc layer it turns 4 tied labels right).

The kernels are Numba-compiled with ``cache=True``: the first call in a fresh process loads them
from ``__pycache__`` instead of compiling.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from numba_math import FAST, LN2, exp32, log32  # FAST keeps NaN/inf semantics: dead rows are NaN


# --- an LLVM-level helper Numba does not expose --------------------------------------------------

@intrinsic
def _prefetch(typingctx, arr, i):
    """Ask the CPU to start loading the cache line of arr[i] (llvm.prefetch; a hint, no effect on
    results). For walks whose next addresses are known a few steps ahead."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        ptr = builder.bitcast(ptr, cgutils.voidptr_t)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, i), codegen


# --- inputs and threads ---------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _count_nonfinite(X: np.ndarray) -> int:
    n = 0
    for i in prange(X.shape[0]):
        for j in range(X.shape[1]):
            if not np.isfinite(X[i, j]):
                n += 1
    return n


def _nonfinite_error(bad: int, what: str, fn: str, name: str | None) -> ValueError:
    layer = f" of layer {name!r}" if name else ""
    return ValueError(f"{fn}: {bad} non-finite value(s) (NaN or inf) in {what}{layer}")


def _check(X: np.ndarray, what: str, fn: str, name: str | None, finite: bool = True) -> np.ndarray:
    """X as C-contiguous float32 2-D; with ``finite`` also no NaN / inf (else ValueError)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{fn}: {what} must be 2-D, got shape {X.shape}")
    bad = _count_nonfinite(X) if finite and X.size else 0
    if bad:
        raise _nonfinite_error(bad, what, fn, name)
    return X


P_WHAT = "P (image-concept similarities)"


def _inputs(A: np.ndarray, P: np.ndarray, fn: str, name: str | None,
            check_P: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Checked (A, P). ``check_P=False`` leaves P's NaN / inf check to the caller (WPMI / SoftWPMI
    fold it into their own read of P)."""
    A = _check(A, "A (activations)", fn, name)
    P = _check(P, P_WHAT, fn, name, finite=check_P)
    if A.shape[0] != P.shape[0]:
        raise ValueError(f"{fn}: A has {A.shape[0]} images (rows) but P has {P.shape[0]}"
                         + (f" (layer {name!r})" if name else ""))
    if A.shape[0] == 0:
        raise ValueError(f"{fn}: no probe images (N = 0)" + (f" (layer {name!r})" if name else ""))
    return A, P


@contextlib.contextmanager
def _threads(n_threads: int | None) -> Iterator[None]:
    """Numba thread count for the duration of one call; restores the caller's setting."""
    if n_threads is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


# --- neurons: active counts and the top-k selection shared by every rank-based similarity ---------

def active_counts(A: np.ndarray) -> np.ndarray:
    """Number of images on which each neuron is non-zero, (K,) int64 (0 = dead neuron)."""
    return np.count_nonzero(np.asarray(A), axis=0).astype(np.int64)


@njit(cache=True, fastmath=FAST)
def _select_top(v: np.ndarray, k: int, out: np.ndarray) -> None:
    """out <- indices of the k largest values of v, largest first; equal values: lower index first.

    One scan with a min-heap of the best k so far (root = the worst kept: smallest value, and among
    equal values the highest index). Scanning in index order, an equal value never displaces a
    kept one, so ties resolve to the lower index; then the k winners are sorted (stable).
    """
    hv = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    n = 0
    for i in range(v.shape[0]):
        x = v[i]
        if n < k:  # push, sift up
            c = n
            n += 1
            while c > 0:
                par = (c - 1) // 2
                if hv[par] < x or (hv[par] == x and hi[par] > i):
                    break
                hv[c] = hv[par]
                hi[c] = hi[par]
                c = par
            hv[c] = x
            hi[c] = i
        elif x > hv[0]:  # replace the root, sift down
            c = 0
            while True:
                ch = 2 * c + 1
                if ch >= k:
                    break
                if ch + 1 < k and (hv[ch + 1] < hv[ch]
                                   or (hv[ch + 1] == hv[ch] and hi[ch + 1] > hi[ch])):
                    ch += 1
                if x < hv[ch] or (x == hv[ch] and i > hi[ch]):
                    break
                hv[c] = hv[ch]
                hi[c] = hi[ch]
                c = ch
            hv[c] = x
            hi[c] = i
    by_index = np.argsort(hi)
    neg = np.empty(k, np.float32)
    for c in range(k):
        neg[c] = -hv[by_index[c]]
    by_value = np.argsort(neg, kind="mergesort")  # stable: equal values stay in index order
    for c in range(k):
        out[c] = hi[by_index[by_value[c]]]


@njit(parallel=True, cache=True)
def _top_images_kernel(A: np.ndarray, k: int) -> np.ndarray:
    N, K = A.shape
    kb = 64  # neurons per task: four cache lines of each row of A
    out = np.empty((K, k), np.int64)
    for b in prange((K + kb - 1) // kb):
        k0 = b * kb
        k1 = min(K, k0 + kb)
        col = np.empty((k1 - k0, N), np.float32)
        for i in range(N):
            for j in range(k1 - k0):
                col[j, i] = A[i, k0 + j]
        for j in range(k1 - k0):
            _select_top(col[j], k, out[k0 + j])
    return out


def top_images(A: np.ndarray, k: int, *, name: str | None = None,
               n_threads: int | None = None) -> np.ndarray:
    """The k most activating image indices of every neuron, (K, min(k, N)) int64, best first.

    Ranking is by activation value, largest first; equal activations keep the lower image index
    first (stable), so the selection is deterministic. Dead neurons get images 0..k-1.
    """
    if k < 1:
        raise ValueError(f"top_images: k must be >= 1, got {k}")
    A = _check(A, "A (activations)", "top_images", name)
    with _threads(n_threads):
        return _top_images_kernel(A, min(int(k), A.shape[0]))


def _invert(top: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, ...]:
    """Image-first index of the live neurons' top lists (CSR): for each image that is in some top
    list, which neurons hold it and at which rank. Returns (rows, indptr, neuron, rank)."""
    live_ids = np.flatnonzero(live)
    T = top.shape[1]
    imgs = top[live_ids].ravel()
    order = np.argsort(imgs, kind="stable")
    rows, counts = np.unique(imgs[order], return_counts=True)
    indptr = np.zeros(rows.size + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    neuron = np.repeat(live_ids, T)[order].astype(np.int32)
    rank = np.tile(np.arange(T), live_ids.size)[order].astype(np.int32)
    return rows.astype(np.int64), indptr, neuron, rank


# --- cos (Eq. 1) and cos^3 ------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=FAST)
def _column_norms(X: np.ndarray) -> np.ndarray:
    N, C = X.shape
    cb = 64
    out = np.empty(C)
    for b in prange((C + cb - 1) // cb):
        c0 = b * cb
        c1 = min(C, c0 + cb)
        s = np.zeros(c1 - c0)
        for i in range(N):
            for j in range(c1 - c0):
                x = np.float64(X[i, c0 + j])
                s[j] += x * x
        for j in range(c1 - c0):
            out[c0 + j] = math.sqrt(s[j])
    return out


@njit(parallel=True, cache=True, fastmath=FAST)
def _centred_cubes(X: np.ndarray, first: int, min_norm: float, out: np.ndarray) -> None:
    """out[:, j] = (x - mean)^3 / max(||(x - mean)^3||, min_norm), x = X[:, first + j]; float64."""
    N, C = out.shape
    cb = 64
    for b in prange((C + cb - 1) // cb):
        c0 = b * cb
        w = min(C, c0 + cb) - c0
        x0 = first + c0
        mean = np.zeros(w)
        for i in range(N):
            for j in range(w):
                mean[j] += X[i, x0 + j]
        mean /= N
        ss = np.zeros(w)
        for i in range(N):
            for j in range(w):
                d = X[i, x0 + j] - mean[j]
                ss[j] += d * d * d * d * d * d
        for j in range(w):
            ss[j] = 1.0 / max(math.sqrt(ss[j]), min_norm)
        for i in range(N):
            for j in range(w):
                d = X[i, x0 + j] - mean[j]
                out[i, c0 + j] = d * d * d * ss[j]


def cos(A: np.ndarray, P: np.ndarray, *, name: str | None = None,
        n_threads: int | None = None) -> np.ndarray:
    """Cosine similarity (CLIP-Dissect Eq. 1): P[:,m]^T q_k / (||P[:,m]|| ||q_k||).

    One BLAS product A^T P, then division by the column norms (float64). A concept column of P
    that is all zero also gives NaN (0/0), as the equation does.
    """
    A, P = _inputs(A, P, "cos", name)
    with _threads(n_threads):
        na, nP = _column_norms(A), _column_norms(P)
    S = A.T @ P
    with np.errstate(divide="ignore", invalid="ignore"):
        S *= (1.0 / na).astype(np.float32)[:, None]
        S *= (1.0 / nP).astype(np.float32)[None, :]
    S[na == 0] = np.nan
    return S


def cos_cubed(A: np.ndarray, P: np.ndarray, *, min_norm: float = 1e-3, name: str | None = None,
              n_threads: int | None = None, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """Cosine of cubed, centred columns ("cos similarity cubed", DISCOVER Table 2).

    Each column of A and of P has its mean over images subtracted, is cubed element-wise and
    divided by max(its L2 norm, ``min_norm``); the score is the dot product of the two. P is
    transformed in column chunks of at most ``chunk_bytes`` (never a whole N x M copy).
    """
    A, P = _inputs(A, P, "cos_cubed", name)
    N, K = A.shape
    M = P.shape[1]
    S = np.empty((K, M), np.float32)
    A3 = np.empty_like(A)
    step = max(1, min(M, chunk_bytes // (4 * N)))
    with _threads(n_threads):
        _centred_cubes(A, 0, float(min_norm), A3)
        for m0 in range(0, M, step):
            P3 = np.empty((N, min(step, M - m0)), np.float32)
            _centred_cubes(P, m0, float(min_norm), P3)
            S[:, m0:m0 + step] = A3.T @ P3
    S[active_counts(A) == 0] = np.nan
    return S


# --- log-probability helpers shared by WPMI and SoftWPMI ------------------------------------------
@njit(cache=True, fastmath=FAST, inline="always")
def _row_max(x: np.ndarray) -> float:
    """max(x) of a finite float32 vector, in 16 lanes so that LLVM vectorises it (a running
    ``max`` is a serial chain of compare-selects that it will not reorder)."""
    lanes = np.full(16, -np.inf, np.float32)
    n = x.shape[0]
    m0 = 0
    while m0 + 16 <= n:
        for j in range(16):
            v = x[m0 + j]
            lanes[j] = v if v > lanes[j] else lanes[j]
        m0 += 16
    mx = np.float32(-np.inf)
    for j in range(16):
        mx = max(mx, lanes[j])
    for m in range(m0, n):
        mx = max(mx, x[m])
    return mx


@njit(parallel=True, cache=True, fastmath=FAST)
def _log_softmax_normaliser(P: np.ndarray, a: float) -> tuple[np.ndarray, int]:
    """(lse, bad): lse[i] = logsumexp_m(a P[i, m]), the normaliser of p(t_m|x_i) =
    softmax_m(a P[i, :]), and the number of non-finite entries of P, in one read of P (this is
    the input check of WPMI / SoftWPMI: lse is only meaningful when bad == 0)."""
    N, M = P.shape
    out = np.empty(N)
    bad = np.zeros(N, np.int64)
    a32 = np.float32(a)
    zero = np.float32(0.0)
    for i in prange(N):
        row = P[i]
        mx = a32 * _row_max(row)  # a > 0
        s = 0.0
        poison = zero  # sum of v * 0: NaN iff the row holds a NaN or an inf ('nnan' is not set)
        for m0 in range(0, M, 256):  # float32 partial sums vectorise fully; terms are <= 1
            part = zero
            blk = row[m0:m0 + 256]
            for m in range(blk.shape[0]):
                v = blk[m]
                poison += v * zero
                part += exp32(a32 * v - mx)
            s += part
        out[i] = mx + math.log(s)
        if np.isnan(poison):
            bad[i] = _count_nonfinite(P[i:i + 1])
    return out, bad.sum()


_SB = 128  # concepts per block: K x 128 float32 running products (+ exponents) fit a core's L2
_AHEAD = 16  # rows of P prefetched ahead while filling a panel (measured: 20-25 % off the kernel)
_EXP_BITS = np.int32(0x7F800000)


@njit(parallel=True, cache=True, fastmath=FAST, error_model="numpy")
def _pmi_kernel(P: np.ndarray, rows: np.ndarray, lse: np.ndarray, indptr: np.ndarray,
                neuron: np.ndarray, rank: np.ndarray, weight: np.ndarray, a: float, eps: float,
                lam: float, live: np.ndarray, renorm_every: int, n_threads: int,
                out: np.ndarray) -> None:
    """WPMI / SoftWPMI for all neurons (App. A.1 Eq. 8 and 14), a block of _SB concepts at a time.

    The blocks are split into ``n_threads`` contiguous runs, one per worker. For each block a
    worker
    1. writes p(t_m|x_i) = exp(a P[i, m] - lse_i) of every image of the top lists into its own
       float32 panel (images x _SB, a few MB: it stays in cache, so the panel never goes through
       main memory; rows of P are prefetched _AHEAD images ahead);
    2. image-first: every neuron k holding image i at rank r multiplies its running product by
       (1 - w_r + eps) + w_r p = 1 + w_r (p - 1) + eps. Every ``renorm_every`` factors (before
       float32 could underflow) the products are renormalised frexp-style: exponent bits move
       into an integer counter, mantissas stay in [1, 2). So each output takes a single log.
    Then _normalise applies Eq. 13-14 to the block.
    """
    M = P.shape[1]
    K = out.shape[0]
    U = rows.shape[0]
    n_live = 0
    for k in range(K):
        n_live += live[k]
    log_n_live = math.log(n_live)
    a32 = np.float32(a)
    n_blocks = (M + _SB - 1) // _SB
    workers = max(1, min(n_threads, n_blocks))
    for worker in prange(workers):
        panel = np.empty((U, _SB), np.float32)
        acc = np.empty((K, _SB), np.float32)
        bits = acc.view(np.int32)
        expo = np.empty((K, _SB), np.int32)
        count = np.empty(K, np.int64)
        for b in range(worker * n_blocks // workers, (worker + 1) * n_blocks // workers):
            c0 = b * _SB
            n = min(_SB, M - c0)
            for t in range(U):
                lse_i = np.float32(lse[t])
                src = P[rows[t], c0:c0 + n]
                if t + _AHEAD < U:  # each row is a new page: start loading a later one now
                    ahead = P[rows[t + _AHEAD]]
                    for j in range(0, n, 16):
                        _prefetch(ahead, c0 + j)
                dst = panel[t]
                for j in range(n):
                    dst[j] = exp32(a32 * src[j] - lse_i)
                for j in range(n, _SB):
                    dst[j] = 0.0  # past the last concept; never stored
            acc[:] = 1.0
            expo[:] = 0
            count[:] = 0
            for t in range(U):
                p = panel[t]
                for q in range(indptr[t], indptr[t + 1]):
                    k = neuron[q]
                    w = weight[rank[q]]
                    c = np.float32((1.0 - w) + eps)
                    w = np.float32(w)
                    row = acc[k]
                    for j in range(_SB):
                        row[j] *= c + w * p[j]
                    count[k] += 1
                    if count[k] == renorm_every:
                        count[k] = 0
                        rb = bits[k]
                        re = expo[k]
                        for j in range(_SB):  # acc = m 2^e, m in [1, 2): keep m, count e
                            re[j] += ((rb[j] & _EXP_BITS) >> 23) - 127
                            rb[j] = (rb[j] & ~_EXP_BITS) | np.int32(127 << 23)
            _normalise(acc, expo, live, lam, log_n_live, out, c0, n)


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _normalise(acc: np.ndarray, expo: np.ndarray, live: np.ndarray, lam: float,
               log_n_live: float, out: np.ndarray, m0: int, width: int) -> None:
    """out[k, m0 + j] = L[k, j] - lam (logsumexp_{live k'} L[k', j] - log #live), j < width, with
    L = log(acc) + expo ln 2 = log E[p(t_m|B_k)] (Eq. 12-14); dead rows NaN."""
    K, B = acc.shape
    L = np.empty((K, B))
    mx = np.full(B, -np.inf)
    for k in range(K):
        if live[k]:
            for j in range(B):  # log32: acc is a normal float32 (renormalised products)
                v = log32(acc[k, j]) + expo[k, j] * LN2
                L[k, j] = v
                mx[j] = v if v > mx[j] else mx[j]
    tot = np.zeros(B)
    for k in range(K):
        if live[k]:
            for j in range(B):
                tot[j] += exp32(L[k, j] - mx[j])
    for j in range(B):
        tot[j] = lam * (mx[j] + math.log(tot[j]) - log_n_live)
    for k in range(K):
        for j in range(width):
            out[k, m0 + j] = L[k, j] - tot[j] if live[k] else np.nan


def _pmi(A: np.ndarray, P: np.ndarray, weight: np.ndarray, a: float, lam: float, eps: float,
         fn: str, name: str | None, n_threads: int | None, dtype: type) -> np.ndarray:
    """Shared driver of WPMI and SoftWPMI: rank weights w_r (1 for WPMI) over the top len(weight)."""
    A, P = _inputs(A, P, fn, name, check_P=False)  # P is checked while lse reads it
    if a <= 0 or eps < 0 or not ((weight >= 0) & (weight <= 1)).all():
        raise ValueError(f"{fn}: need a > 0, eps >= 0 and probabilities p(x in B_k) in [0, 1]; "
                         f"got a={a}, eps={eps}, p in [{weight.min():.3g}, {weight.max():.3g}]")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"{fn}: dtype must be float32 or float64, got {dtype}")
    K, M = A.shape[1], P.shape[1]
    live = active_counts(A) > 0
    if not live.any() or M == 0:
        _check(P, P_WHAT, fn, name)
        return np.full((K, M), np.nan, dtype)
    with _threads(n_threads):
        lse, bad = _log_softmax_normaliser(P, float(a))
        if bad:
            raise _nonfinite_error(bad, P_WHAT, fn, name)
        top = _top_images_kernel(A, min(weight.size, A.shape[0]))
        rows, indptr, neuron, rank = _invert(top, live)
        # Factors are >= f_min, so a float32 product of n of them (from [1, 2)) stays above 1e-37
        # (no underflow, no subnormals) while n <= n_safe: renormalise that often.
        f_min = max(float(np.min((1.0 - weight) + eps)), 1e-38)  # p itself is >= exp(-87)
        renorm_every = max(1, int(-37.0 / math.log10(f_min))) if f_min < 1.0 else 1 << 62
        S = np.empty((K, M), dtype)  # every entry is written (dead neurons' rows NaN)
        _pmi_kernel(P, rows, lse[rows], indptr, neuron, rank, weight.astype(np.float64),
                    float(a), float(eps), float(lam), live, renorm_every,
                    numba.get_num_threads(), S)
    return S


def wpmi(A: np.ndarray, P: np.ndarray, *, a: float = 2.0, top_k: int = 28, lam: float = 0.6,
         eps: float = 1e-7, name: str | None = None, n_threads: int | None = None,
         dtype: type = np.float32) -> np.ndarray:
    """Weighted pointwise mutual information (CLIP-Dissect Eq. 3; App. A.1 Eq. 6-8).

        p(t_m|x_i)      = softmax_m(a P[i, :])
        log p(t_m|B_k)  = sum_{i in B_k} log(p(t_m|x_i) + eps),   B_k = the top_k images of k
        log p(t_m)      = logsumexp_{j live} log p(t_m|B_j) - log(#live)
        wpmi[k, m]      = log p(t_m|B_k) - lam log p(t_m)

    Defaults a=2, top 28, lam=0.6 (App. A.1); eps=1e-7 as in the reference code. ``dtype``: of
    the scores (float64 keeps saturated concepts apart; module docstring, Precision).
    """
    if top_k < 1:
        raise ValueError(f"wpmi: top_k must be >= 1, got {top_k}")
    return _pmi(A, P, np.ones(int(top_k)), a, lam, eps, "wpmi", name, n_threads, dtype)


def soft_wpmi(A: np.ndarray, P: np.ndarray, *, a: float = 10.0, top_k: int = 100,
              lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97, eps: float = 1e-7,
              name: str | None = None, n_threads: int | None = None,
              dtype: type = np.float32) -> np.ndarray:
    """SoftWPMI, the paper's best similarity (CLIP-Dissect Eq. 4; App. A.1 Eq. 12-14).

        p(x_i in B_k)        = p_start - r/top_k (p_start - p_end) for the image of rank r
                               (0-based) among the top_k of neuron k, 0 for all others
        log E[p(t_m|B_k)]    = sum_i log(1 + p(x_i in B_k)(p(t_m|x_i) - 1) + eps)
        log p(t_m)           = logsumexp_{j live} log E[p(t_m|B_j)] - log(#live)
        soft_wpmi[k, m]      = log E[p(t_m|B_k)] - lam log p(t_m)

    Defaults a=10, lam=1, top 100, p from 0.998 down to 0.97 (App. A.1); eps=1e-7 as in the
    reference code. ``dtype``: of the scores (float64 keeps saturated concepts apart; module
    docstring, Precision).
    """
    if top_k < 1:
        raise ValueError(f"soft_wpmi: top_k must be >= 1, got {top_k}")
    weight = p_start - np.arange(int(top_k)) / int(top_k) * (p_start - p_end)
    return _pmi(A, P, weight, a, lam, eps, "soft_wpmi", name, n_threads, dtype)


# --- rank reorder (Eq. 2) -------------------------------------------------------------------------

@njit(cache=True)
def _radix_argsort(vals: np.ndarray, keys: np.ndarray, keys2: np.ndarray, idx: np.ndarray,
                   idx2: np.ndarray, hist: np.ndarray) -> np.ndarray:
    """Stable ascending argsort of float32 ``vals`` (LSD radix, 4 passes of 8 bits; a pass whose
    digit is the same for all keys is skipped). Equal values keep their index order. Returns the
    buffer that holds the permutation."""
    n = vals.shape[0]
    raw = vals.view(np.uint32)
    hist[:] = 0
    for t in range(n):
        u = raw[t]
        if vals[t] == 0.0:
            u = np.uint32(0)  # -0.0 == +0.0
        key = ~u if u >> np.uint32(31) else u | np.uint32(0x80000000)
        keys[t] = key
        idx[t] = t
        for d in range(4):
            hist[d, (key >> np.uint32(8 * d)) & np.uint32(255)] += 1
    for d in range(4):
        if hist[d, (keys[0] >> np.uint32(8 * d)) & np.uint32(255)] == n:
            continue
        start = 0
        for c in range(256):
            h = hist[d, c]
            hist[d, c] = start
            start += h
        for t in range(n):
            c = (keys[t] >> np.uint32(8 * d)) & np.uint32(255)
            dst = hist[d, c]
            hist[d, c] = dst + 1
            keys2[dst] = keys[t]
            idx2[dst] = idx[t]
        keys, keys2 = keys2, keys
        idx, idx2 = idx2, idx
    return idx


@njit(parallel=True, cache=True, fastmath=FAST, error_model="numpy")
def _rank_reorder_kernel(P: np.ndarray, rows: np.ndarray, indptr: np.ndarray, neuron: np.ndarray,
                         position: np.ndarray, q: np.ndarray, live: np.ndarray, power: float,
                         scale_power: float, out: np.ndarray) -> None:
    """Rank reorder for all neurons, a block of concepts per task.

    Per concept m, the images of the union of all top lists are sorted once by P[:, m] (stable:
    ties by image index). Walking them in ascending order, the r-th time neuron k is met is its
    image of ascending rank r within T_k; the walk records r at the image's position in the
    neuron's top list (CSR ``position``) and sums P for the mean. Then per neuron, q'[j] =
    q[k, n - 1 - r_j] (its r_j-th smallest top activation; q is descending). O(n K) per concept
    instead of one sort per neuron and concept.
    """
    M = P.shape[1]
    K, n = q.shape
    U = rows.shape[0]
    cb = 64
    for b in prange((M + cb - 1) // cb):
        m0 = b * cb
        w = min(M, m0 + cb) - m0
        col = np.empty((w, U), np.float32)
        for t in range(U):
            for j in range(w):
                col[j, t] = P[rows[t], m0 + j]
        keys = np.empty(U, np.uint32)
        keys2 = np.empty(U, np.uint32)
        idx = np.empty(U, np.int64)
        idx2 = np.empty(U, np.int64)
        hist = np.empty((4, 256), np.int64)
        seen = np.empty(K, np.int64)
        psum = np.empty(K)
        rank_in_top = np.empty((K, n), np.int32)
        for j in range(w):
            order = _radix_argsort(col[j], keys, keys2, idx, idx2, hist)
            seen[:] = 0
            psum[:] = 0.0
            for s in range(U):
                if s + 16 < U:  # the walk jumps around the index: fetch 16 images ahead
                    ahead = order[s + 16]
                    for e in range(indptr[ahead], indptr[ahead + 1], 16):
                        _prefetch(neuron, e)
                        _prefetch(position, e)
                t = order[s]
                v = np.float64(col[j, t])
                for e in range(indptr[t], indptr[t + 1]):
                    k = neuron[e]
                    rank_in_top[k, position[e]] = seen[k]
                    seen[k] += 1
                    psum[k] += v
            for k in range(K):
                if not live[k]:
                    out[k, m0 + j] = np.nan
                    continue
                err = 0.0
                for i in range(n):
                    d = abs(np.float64(q[k, i]) - q[k, n - 1 - rank_in_top[k, i]])
                    err += d * d * d if power == 3.0 else d ** power
                if psum[k] <= 0.0:
                    out[k, m0 + j] = -np.inf
                else:
                    out[k, m0 + j] = -(err / n) / (psum[k] / n) ** scale_power


def rank_reorder(A: np.ndarray, P: np.ndarray, *, top_fraction: float = 0.05, power: float = 3.0,
                 scale_power: float = 0.5, name: str | None = None,
                 n_threads: int | None = None) -> np.ndarray:
    """Rank reorder (CLIP-Dissect Eq. 2; App. A.1: top 5 %, p = 3), as the reference code scores it.

    T_k = the n = max(1, floor(top_fraction N)) most activating images of neuron k, q = their
    activations sorted descending. q'[j] = the activation of q whose rank equals the rank P[:, m]
    gives image j within T_k (ties in P: lower image index ranks lower). Then

        rank_reorder[k, m] = -mean_j |q[j] - q'[j]|^power / (mean_{i in T_k} P[i, m])^scale_power

    (largest, 0, when P orders T_k as the neuron does). A concept whose mean P over T_k is <= 0
    scores -inf. The reference also divides by a per-neuron random-permutation baseline; that
    constant does not change a neuron's label and is left out here (deterministic scores).
    """
    A, P = _inputs(A, P, "rank_reorder", name)
    if not 0 < top_fraction <= 1:
        raise ValueError(f"rank_reorder: top_fraction must be in (0, 1], got {top_fraction}")
    K, M = A.shape[1], P.shape[1]
    S = np.full((K, M), np.nan, np.float32)
    live = active_counts(A) > 0
    if not live.any() or M == 0:
        return S
    n = max(1, int(A.shape[0] * top_fraction))
    with _threads(n_threads):
        top = _top_images_kernel(A, n)
        q = np.take_along_axis(A.T, top, axis=1)  # descending
        rows, indptr, neuron, rank = _invert(top, live)
        _rank_reorder_kernel(P, rows, indptr, neuron, rank, q, live, float(power),
                             float(scale_power), S)
    return S


SIMILARITIES: dict[str, Callable[..., np.ndarray]] = {
    "cos": cos,
    "cos3": cos_cubed,
    "rank_reorder": rank_reorder,
    "wpmi": wpmi,
    "soft_wpmi": soft_wpmi,
}


# --- float64 references ---------------------------------------------------------------------------
# Plain NumPy transcriptions of the equations (CLIP-Dissect Sec. 3.2, App. A.1; DISCOVER Table 2),
# one loop per neuron, float64, written from the papers and never calling the kernels above: what
# the tests check every kernel against, and what anyone can check a kernel's output with.

def reference_top(q: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest activations, ties: lower index first."""
    return np.lexsort((np.arange(q.size), -q))[:k]


def reference_cos(A, P):
    """cos(A_k, P_m) for every neuron k and concept m (Eq. 1)."""
    return (A / np.linalg.norm(A, axis=0)).T @ (P / np.linalg.norm(P, axis=0))  # Eq. 1


def reference_cos_cubed(A, P, min_norm=1e-3):
    """cos^3 (DISCOVER Table 2): cosine of the cubed, column-centred A and P."""
    def f(X):
        X = (X - X.mean(axis=0)) ** 3
        return X / np.maximum(np.linalg.norm(X, axis=0), min_norm)
    return f(A).T @ f(P)


def reference_rank_reorder(A, P, frac=0.05, power=3.0, scale_power=0.5):
    """Rank reorder (Eq. 2): the neuron's top activations reordered by each concept's ranking."""
    N, K = A.shape
    n = max(1, int(N * frac))
    S = np.empty((K, P.shape[1]))
    for k in range(K):
        top = reference_top(A[:, k], n)
        q = A[top, k]  # descending
        for m in range(P.shape[1]):
            rank = np.empty(n, int)
            rank[np.lexsort((top, P[top, m]))] = np.arange(n)  # ascending rank under P
            q_re = q[::-1][rank]  # the activation with the same rank as the image has under P
            mean_p = P[top, m].mean()
            err = np.mean(np.abs(q - q_re) ** power)
            S[k, m] = -err / mean_p ** scale_power if mean_p > 0 else -np.inf
    return S


def reference_pmi(A, P, a, top_k, lam, weight, eps=1e-7):
    """Eq. 12-14 (weight = p(x in B_k) by rank; all ones gives WPMI, Eq. 6-8)."""
    logits = a * P
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)  # p(t_m | x_i) = softmax_m(a P[i, :])
    K = A.shape[1]
    L = np.full((K, P.shape[1]), np.nan)
    for k in range(K):
        top = reference_top(A[:, k], top_k)
        w = weight[: top.size, None]
        L[k] = np.log(1 + w * (p[top] - 1) + eps).sum(axis=0)  # log E[p(t_m|B_k)]
    live = (A != 0).any(axis=0)  # dead neurons: NaN and outside the normaliser
    L[~live] = np.nan
    Ll = L[live]
    mx = Ll.max(axis=0)
    log_pt = mx + np.log(np.exp(Ll - mx).sum(axis=0)) - np.log(live.sum())  # log p(t_m)
    return L - lam * log_pt


def reference_wpmi(A, P, a=2.0, top_k=28, lam=0.6):
    """WPMI (Eq. 6-8)."""
    return reference_pmi(A, P, a, top_k, lam, np.ones(top_k))


def reference_soft_wpmi(A, P, a=10.0, top_k=100, lam=1.0, p_start=0.998, p_end=0.97):
    """SoftWPMI (Eq. 12-14)."""
    weight = p_start - np.arange(top_k) / top_k * (p_start - p_end)
    return reference_pmi(A, P, a, top_k, lam, weight)


REFERENCES: dict[str, Callable[..., np.ndarray]] = {
    "cos": reference_cos, "cos3": reference_cos_cubed, "rank_reorder": reference_rank_reorder,
    "wpmi": reference_wpmi, "soft_wpmi": reference_soft_wpmi}
