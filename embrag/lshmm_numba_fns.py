"""Compiled kernel of the Li-Stephens prior (``embrag.lshmm``): forward-backward and P(ALT), one query at a time.

Why compiled, and why fused: the numpy chain (``lshmm.state_posteriors``, kept as this kernel's
reference) made five passes over a ``(Q, H)`` slab per typed site and stored every posterior of a
block, ~0.8 GB for 1,000 queries, which the interpolation then read back: 4.4 ns per state and
site, memory-bound. Here a query's forward rows stay in a buffer the size of L2, its posteriors
at two consecutive typed sites exist only as two rows in L1, and the P(ALT) of every site between
them is read from those rows at once: a sum over the site's minor-allele carriers (5 % of the panel
at 800 haplotypes), not a product with every haplotype (what the BLAS interpolation did).

Scales differ from the reference, not results: a stored forward row keeps its own scale (the
recursion divides by its sum on the fly) and the backward is divided by its emission-weighted sum
at every site; both cancel when a posterior row is normalised.
"""

from __future__ import annotations

import numba
import numpy as np

# Reassociation lets LLVM vectorise the float32 sums (2.6x on the forward); nothing here needs IEEE order.
_FAST = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def prior_at_sites(query: np.ndarray, panel_t: np.ndarray, rows: np.ndarray, allowed: np.ndarray,
                   stay: np.ndarray, land: np.ndarray, eps: float, a0: int, ptr: np.ndarray, site: np.ndarray,
                   w_left: np.ndarray, carrier_ptr: np.ndarray, carrier: np.ndarray, value: np.ndarray,
                   flip: np.ndarray, out: np.ndarray) -> None:
    """Writes into ``out (Q, S)`` the Li-Stephens P(ALT) at ``S`` sites.

    ``query uint8 (Q, T)`` 0/1, 2 unknown; ``panel_t uint8 (T, Hp)`` the panel at the typed sites,
    site-major; ``rows int64 (Q, H)`` the panel row of each query's state, or shape ``(0, 0)`` when
    the states are the panel's rows; ``allowed (Q, H)`` 1.0 where a query may copy the state, else
    0.0; ``stay, land (Q, T - 1)`` between columns j and j + 1: keep the state / land on one.

    Sites: ``site[k]`` for ``k`` in ``ptr[c] .. ptr[c + 1] - 1`` lies at or after column ``a0 + c`` and before
    the next; it takes ``w_left[k]`` of that column's posterior and the rest of the next column's. A site's
    panel alleles are sparse: ``carrier[i]`` (panel rows) with ``value[i]`` for ``i`` in
    ``carrier_ptr[s] .. carrier_ptr[s + 1] - 1``, the ALT indicator (an unknown allele: the site's AF), or,
    where ``flip[s]``, one minus it (ALT the majority): then P(ALT) = 1 - the sum.
    """
    q_n, t_n = query.shape
    h_n, n_panel = allowed.shape[1], panel_t.shape[1]
    b0 = min(t_n, a0 + len(ptr))  # a site reads its column and the next; the forward stops there
    dt = out.dtype.type
    hi, lo = dt(1.0 - eps), dt(eps)
    zero, one, tiny = dt(0.0), dt(1.0), dt(1e-30)
    fwd = np.empty((b0 - a0, h_n), out.dtype)  # this query's forward rows at the columns read
    spare = np.empty((2, h_n), out.dtype)  # the forward before a0, two rows in turn
    b = np.empty(h_n, out.dtype)  # backward row
    post = np.zeros((2, h_n), out.dtype)  # posterior rows of a column and of the next, in turn
    own = rows.shape[0] > 0
    state = np.empty(n_panel, np.int64)  # own states: panel row -> state index, -1 if not a state
    for q in range(q_n):
        if own:  # this query's own states: their alleles at the typed sites, once
            pan = np.empty((t_n, h_n), np.uint8)
            for j in range(t_n):
                for h in range(h_n):
                    pan[j, h] = panel_t[j, rows[q, h]]
            state[:] = -1
            for h in range(h_n):
                if allowed[q, h] > 0:
                    state[rows[q, h]] = h
        else:
            pan = panel_t
        ok = allowed[q]
        # forward: row j holds alpha_j times a scale of its own; ``s`` is that row's sum
        prev = fwd[0] if a0 == 0 else spare[0]
        qa = query[q, 0]
        s = zero
        for h in range(h_n):
            pa = pan[0, h]
            v = (hi if (pa == qa) | (pa == 2) | (qa == 2) else lo) * ok[h]
            prev[h] = v
            s += v
        for j in range(1, b0):
            cur = fwd[j - a0] if j >= a0 else spare[j % 2]
            f = stay[q, j - 1] / max(s, tiny)
            ld = land[q, j - 1]
            qa = query[q, j]
            s = zero
            for h in range(h_n):
                pa = pan[j, h]
                v = (prev[h] * f + ld) * (hi if (pa == qa) | (pa == 2) | (qa == 2) else lo) * ok[h]
                cur[h] = v
                s += v
            prev = cur
        # backward from the chain's end; at each column read: its posterior row, then the sites after it
        for h in range(h_n):
            b[h] = ok[h]
        for j in range(t_n - 1, a0 - 1, -1):
            if j < t_n - 1:
                qa = query[q, j + 1]
                s = zero
                for h in range(h_n):
                    pa = pan[j + 1, h]
                    v = b[h] * (hi if (pa == qa) | (pa == 2) | (qa == 2) else lo)
                    b[h] = v
                    s += v
                f = stay[q, j] / max(s, tiny)
                ld = land[q, j]
                for h in range(h_n):
                    b[h] = (b[h] * f + ld) * ok[h]
            if j >= b0:
                continue
            here, after = post[j % 2], post[(j + 1) % 2]
            row = fwd[j - a0]
            s = zero
            for h in range(h_n):
                v = row[h] * b[h]
                here[h] = v
                s += v
            dead = s <= tiny  # no state the query may copy: P(ALT) 0, as the reference's all-zero posterior
            inv = one / max(s, tiny)
            for h in range(h_n):
                here[h] *= inv
            c = j - a0
            if c + 1 >= len(ptr):
                continue
            for k in range(ptr[c], ptr[c + 1]):
                i = site[k]
                wl = w_left[k]
                wr = one - wl
                acc = zero
                for e in range(carrier_ptr[i], carrier_ptr[i + 1]):
                    h = carrier[e]
                    if own:
                        h = state[h]
                        if h < 0:
                            continue
                    acc += (wl * here[h] + wr * after[h]) * value[e]
                out[q, i] = zero if dead else (one - acc if flip[i] else acc)
