"""The d-way CP engine behind cp.py and separable_basis.py: ALS sweeps and structured LM.

The model is ``T ~ [[A_1, ..., A_d]]``, ``T[i_1..i_d] = sum_r prod_k A_k[i_k, r]``, fitted in
float64 to a tensor scaled to unit norm, minimising
``f = 1/2 ||T - [[A]]||^2 + mu/2 sum_k ||A_k||^2``.
Everything is expressed through the Gram matrices ``G_k = A_k^T A_k`` and the MTTKRPs
``M_k = T_(k) (Khatri-Rao of the other factors)``:

- gradient ``g_k = A_k V_k - M_k + mu A_k`` with ``V_k = Hadamard_{j != k} G_j``;
- Gauss-Newton matrix ``J^T J``: diagonal blocks ``V_k (x) I``, off-diagonal blocks applied to a
  step ``P`` as ``A_k ((P_l^T A_l) * Hadamard_{j != k,l} G_j)`` (Tomasi & Bro 2006; Sorber et al.
  2013), so one product costs ``O(sum_k I_k R^2)`` and the dense Jacobian is never formed;
- each Levenberg-Marquardt step solves ``(J^T J + (mu + lambda) I) p = -g`` by conjugate
  gradients preconditioned with the block diagonal ``(V_k + (mu + lambda) I)^-1``.

The two MTTKRP contractions with the two largest modes are the only passes over ``T`` (one
to evaluate a trial step, one more when it is accepted), so an LM iteration costs about one ALS
sweep plus a few small ``I_k x R x R`` products per CG step. This is the fitting approach of
Lebedev et al. 2015 ("Speeding-up CNNs using fine-tuned CP-decomposition", arXiv:1412.6553).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

Factors = list[np.ndarray]
# Below this many parameters the damped normal equations are solved directly.
DENSE_LIMIT = 1500


def hadamard_grams(grams: Factors, skip: tuple[int, ...]) -> np.ndarray:
    """Elementwise product of the Gram matrices whose mode is not in ``skip``."""
    rank = grams[0].shape[0]
    out = np.ones((rank, rank))
    for k, gram in enumerate(grams):
        if k not in skip:
            out = out * gram
    return out


def contraction_modes(shape: tuple[int, ...]) -> tuple[int, int]:
    """The two largest modes: contracting them first keeps every intermediate small."""
    order = np.argsort(shape, kind="stable")[::-1]
    return int(order[0]), int(order[1])


def unfoldings(tensor: np.ndarray) -> dict[int, np.ndarray]:
    """Contiguous ``(prod of other modes, I_k)`` matrices for the two contraction modes."""
    return {
        k: np.ascontiguousarray(np.moveaxis(tensor, k, -1).reshape(-1, tensor.shape[k]))
        for k in contraction_modes(tensor.shape)
    }


def model(factors: Factors) -> np.ndarray:
    """The dense tensor ``[[A_1, ..., A_d]]``."""
    d = len(factors)
    operands = [x for k, a in enumerate(factors) for x in (a, [k, d])]
    return np.einsum(*operands, list(range(d)), optimize=True)


def contract(tensor: np.ndarray, unf: dict, factor: np.ndarray, mode: int) -> np.ndarray:
    """``T x_mode A_mode^T``: the other modes in order, then the rank axis (one GEMM)."""
    others = [tensor.shape[j] for j in range(tensor.ndim) if j != mode]
    return (unf[mode] @ factor).reshape(others + [factor.shape[1]])


def finish(q: np.ndarray, factors: Factors, mode: int, target: int) -> np.ndarray:
    """MTTKRP ``M_target`` from ``q = contract(..., mode)`` and the remaining factors."""
    d = len(factors)
    others = [j for j in range(d) if j != mode]
    operands = [q, others + [d]]
    for j in others:
        if j != target:
            operands += [factors[j], [j, d]]
    return np.einsum(*operands, [target, d], optimize=True)


def all_mttkrps(tensor: np.ndarray, unf: dict, factors: Factors) -> Factors:
    """``M_k`` for every mode with two passes over the tensor."""
    big, second = contraction_modes(tensor.shape)
    q_big = contract(tensor, unf, factors[big], big)
    out = [finish(q_big, factors, big, k) if k != big else None for k in range(tensor.ndim)]
    out[big] = finish(contract(tensor, unf, factors[second], second), factors, second, big)
    return out


def balance_scales(factors: Factors) -> np.ndarray:
    """Column scales ``(d, R)`` that give every factor of a rank-1 term the same norm."""
    norms = np.stack([np.linalg.norm(a, axis=0) for a in factors])
    target = np.prod(norms, axis=0) ** (1.0 / len(factors))
    return np.where(norms > 0, target / np.where(norms > 0, norms, 1.0), 0.0)


def balance(factors: Factors) -> Factors:
    """Spread each rank-1 term's norm equally over its d factor columns (model unchanged)."""
    return [a * s for a, s in zip(factors, balance_scales(factors), strict=True)]


def diagnostics(factors: Factors) -> tuple[float, float]:
    """Degeneracy indicators for a fit of a unit-norm tensor.

    Returns ``(norm_ratio, min_congruence)``: ``sqrt(sum_r ||term_r||^2)``, which is about the
    model norm (1) when terms do not cancel and grows without bound in a degenerate fit; and the
    most negative Tucker congruence ``prod_k cos(a_k^r, a_k^s)`` over pairs ``r != s``, near -1
    for two nearly opposite, cancelling terms.
    """
    norms = [np.linalg.norm(a, axis=0) for a in factors]
    norm_ratio = float(np.sqrt(np.sum(np.prod(norms, axis=0) ** 2)))
    congruence = np.ones((factors[0].shape[1],) * 2)
    for a, n in zip(factors, norms, strict=True):
        unit = a / np.where(n > 0, n, 1.0)
        congruence = congruence * (unit.T @ unit)
    np.fill_diagonal(congruence, np.inf)
    return norm_ratio, float(min(congruence.min(), 1.0))


def fit_error_sq(inner: float, grams: Factors) -> float:
    """``||T - [[A]]||^2`` for a unit-norm ``T`` from ``<T, [[A]]>`` and the Grams."""
    return max(1.0 - 2.0 * inner + float(hadamard_grams(grams, ()).sum()), 0.0)


def _solve_right(rhs: np.ndarray, gram: np.ndarray, shift: float) -> np.ndarray:
    """``rhs (gram + shift I)^-1`` for a symmetric positive semi-definite ``gram``."""
    shift = max(shift, 1e-12 * max(float(np.trace(gram)), 1e-300))
    system = gram + shift * np.eye(gram.shape[0])
    return linalg.cho_solve(linalg.cho_factor(system), rhs.T).T


def als(
    tensor, factors: Factors, *, max_iter: int, tol: float, mu: float, mu_per_misfit: float = 0.0
) -> tuple[Factors, int]:
    """Ridge ALS: per mode ``A_k = M_k (V_k + mu I)^-1``; two tensor passes per sweep.

    The ridge is ``mu + mu_per_misfit * ||T - [[A]]||^2`` with the misfit of the last sweep.
    """
    unf = unfoldings(tensor)
    big, second = contraction_modes(tensor.shape)
    small = [k for k in range(tensor.ndim) if k not in (big, second)]
    factors = balance([a.copy() for a in factors])
    grams = [a.T @ a for a in factors]
    previous, sweep, ridge = np.inf, 0, mu + mu_per_misfit
    while sweep < max_iter:
        sweep += 1
        for mode, targets in ((big, [second]), (second, [big, *small])):
            q = contract(tensor, unf, factors[mode], mode)
            for k in targets:
                m_k = finish(q, factors, mode, k)
                factors[k] = _solve_right(m_k, hadamard_grams(grams, (k,)), ridge)
                grams[k] = factors[k].T @ factors[k]
        error = np.sqrt(fit_error_sq(float(np.sum(factors[k] * m_k)), grams))
        factors = balance(factors)
        grams = [a.T @ a for a in factors]
        ridge = mu + mu_per_misfit * error**2
        if not np.isfinite(error) or (np.isfinite(previous) and previous - error <= tol * previous):
            break
        previous = error
    return factors, sweep


class _GaussNewton:
    """``J^T J + shift I`` at fixed factors, applied implicitly through the Grams."""

    def __init__(self, factors: Factors, grams: Factors, shift: float) -> None:
        d = len(factors)
        self.factors, self.shift = factors, shift
        self.diag = [hadamard_grams(grams, (k,)) for k in range(d)]
        self.pair = {(k, m): hadamard_grams(grams, (k, m)) for k in range(d) for m in range(d)}
        self.precond = [_inverse(v + shift * np.eye(v.shape[0])) for v in self.diag]

    def apply(self, step: Factors) -> Factors:
        """``(J^T J + shift I) step``."""
        cross = [p.T @ a for p, a in zip(step, self.factors, strict=True)]
        out = []
        for k, (p, a) in enumerate(zip(step, self.factors, strict=True)):
            mixed = sum(cross[m] * self.pair[k, m] for m in range(len(step)) if m != k)
            out.append(p @ self.diag[k] + a @ mixed + self.shift * p)
        return out

    def dense(self) -> np.ndarray:
        """The operator as a matrix over the row-major concatenation of the factors."""
        blocks = []
        for k, a_k in enumerate(self.factors):
            row = []
            for m, a_m in enumerate(self.factors):
                if k == m:
                    block = np.kron(
                        np.eye(a_k.shape[0]), self.diag[k] + self.shift * np.eye(len(a_k.T))
                    )
                else:
                    block = np.einsum("it,tr,jr->irjt", a_k, self.pair[k, m], a_m)
                row.append(block.reshape(a_k.size, a_m.size))
            blocks.append(row)
        return np.block(blocks)

    def solve(self, rhs: Factors, *, tol: float, max_iter: int) -> tuple[Factors, float]:
        """Preconditioned CG (Cholesky when small); returns the step and ``step . (op step)``."""
        if sum(r.size for r in rhs) <= DENSE_LIMIT:
            flat = np.concatenate([r.ravel() for r in rhs])
            solution = linalg.cho_solve(linalg.cho_factor(self.dense()), flat)
            bounds = np.cumsum([0] + [r.size for r in rhs])
            x = [solution[lo:hi].reshape(r.shape) for lo, hi, r in zip(bounds, bounds[1:], rhs)]
            return x, _dot(x, rhs)
        x = [np.zeros_like(r) for r in rhs]
        resid = [r.copy() for r in rhs]
        z = [r @ m for r, m in zip(resid, self.precond, strict=True)]
        direction, rz = z, _dot(resid, z)
        stop = tol * np.sqrt(_dot(rhs, rhs))
        for _ in range(max_iter):
            product = self.apply(direction)
            alpha = rz / _dot(direction, product)
            x = [xi + alpha * p for xi, p in zip(x, direction, strict=True)]
            resid = [r - alpha * ap for r, ap in zip(resid, product, strict=True)]
            if np.sqrt(_dot(resid, resid)) <= stop:
                break
            z = [r @ m for r, m in zip(resid, self.precond, strict=True)]
            rz_next = _dot(resid, z)
            direction = [zi + (rz_next / rz) * p for zi, p in zip(z, direction, strict=True)]
            rz = rz_next
        # x . A x = x . b - x . r, since A x = b - r.
        return x, _dot(x, rhs) - _dot(x, resid)


def _dot(xs: Factors, ys: Factors) -> float:
    return float(sum(np.vdot(x, y) for x, y in zip(xs, ys, strict=True)))


def _inverse(matrix: np.ndarray) -> np.ndarray:
    return linalg.cho_solve(linalg.cho_factor(matrix), np.eye(matrix.shape[0]))


class _State:
    """An LM iterate: balanced factors, their Grams, the big-mode tensor pass and ``f``."""

    def __init__(self, tensor, unf, factors: Factors) -> None:
        self.tensor, self.unf = tensor, unf
        self.big, self.second = contraction_modes(tensor.shape)
        self.factors = factors
        self.grams = [a.T @ a for a in factors]
        self.q_big = contract(tensor, unf, factors[self.big], self.big)
        probe = next(k for k in range(tensor.ndim) if k != self.big)
        inner = float(np.sum(factors[probe] * finish(self.q_big, factors, self.big, probe)))
        self.fit = 0.5 * fit_error_sq(inner, self.grams)

    def value(self, mu: float) -> float:
        """The penalised objective ``f``."""
        return self.fit + 0.5 * mu * sum(float(np.trace(g)) for g in self.grams)

    def balanced(self) -> _State:
        """Rebalance in place of a new pass: Grams and the tensor pass just rescale."""
        scales = balance_scales(self.factors)
        self.factors = [a * s for a, s in zip(self.factors, scales, strict=True)]
        self.grams = [g * np.outer(s, s) for g, s in zip(self.grams, scales, strict=True)]
        self.q_big = self.q_big * scales[self.big]
        return self

    def mttkrps(self) -> Factors:
        """All MTTKRPs (one more tensor pass, for the big mode)."""
        out = [
            finish(self.q_big, self.factors, self.big, k) if k != self.big else None
            for k in range(len(self.factors))
        ]
        q_second = contract(self.tensor, self.unf, self.factors[self.second], self.second)
        out[self.big] = finish(q_second, self.factors, self.second, self.big)
        return out


def levenberg_marquardt(
    tensor,
    factors: Factors,
    *,
    max_iter: int,
    tol: float,
    mu: float,
    mu_per_misfit: float = 0.0,
    cg_iter: int = 8,
) -> tuple[Factors, int]:
    """Damped Gauss-Newton on all factors at once, with Nielsen's damping update.

    The penalty weight is ``mu + mu_per_misfit * ||T - [[A]]||^2`` at each iterate.
    """
    unf = unfoldings(tensor)
    state = _State(tensor, unf, balance(factors))
    damping = 1e-3 * max(float(np.max(g)) for g in state.grams) ** (len(factors) - 1)
    growth, iterations, mttkrps = 2.0, 0, None
    while iterations < max_iter:
        iterations += 1
        weight = mu + mu_per_misfit * 2.0 * state.fit
        mttkrps = state.mttkrps() if mttkrps is None else mttkrps
        system = _GaussNewton(state.factors, state.grams, weight + damping)
        rhs = [
            m - a @ v - weight * a
            for a, v, m in zip(state.factors, system.diag, mttkrps, strict=True)
        ]
        step, curvature = system.solve(rhs, tol=1e-6, max_iter=cg_iter)
        # Decrease predicted by the undamped quadratic model.
        predicted = _dot(step, rhs) - 0.5 * (curvature - damping * _dot(step, step))
        trial = _State(tensor, unf, [a + p for a, p in zip(state.factors, step, strict=True)])
        now, then = state.value(weight), trial.value(weight)
        ratio = (now - then) / predicted if predicted > 0 else -1.0
        if np.isfinite(then) and ratio > 0:
            state, mttkrps = trial.balanced(), None
            damping *= max(1.0 / 3.0, 1.0 - (2.0 * ratio - 1.0) ** 3)
            growth = 2.0
            if now - then <= tol * max(now, 1e-30):
                break
        else:
            damping, growth = damping * growth, growth * 2.0
            if damping > 1e12:
                break
    return state.factors, iterations
