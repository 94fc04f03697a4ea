"""Residual CNN denoisers for unrolled networks (2D, 3D and 2D+time).

Complex images are handled as two real channels (real, imaginary). Every denoiser here is a
residual map ``D(x) = x + f(x)``; with ``spectral_norm=True`` each convolution of the residual
branch ``f`` is spectrally normalised (``torch.nn.utils.parametrizations.spectral_norm``) and the
branch is scaled by ``residual_scale < 1``, which is what makes ``D`` invertible by the fixed-point
iteration ``x ← z − f(x)`` used in memory-efficient (reversible) backpropagation.

Caveat, stated honestly: torch's spectral normalisation divides a convolution kernel by the
spectral norm of its reshaped ``(out, in·k^d)`` matrix, which bounds the convolution's operator
norm only up to a factor ``k^{d/2}``. :meth:`ResidualCNN.lipschitz_estimate` measures the real
operator norms by power iteration, and :class:`~qmrkit.learn.UnrolledNet` checks at run time that
every inversion converged (falling back to recomputation when it did not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from ..errors import ParameterError, ShapeError


def complex_to_channels(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(*batch, *spatial)`` complex -> ``(B, 2, *spatial)`` real (batch dims flattened)."""
    spatial = x.shape[x.ndim - ndim :]
    xr = torch.view_as_real(x.reshape(-1, *spatial))  # (B, *spatial, 2)
    return xr.movedim(-1, 1)


def channels_to_complex(x: torch.Tensor, batch: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`complex_to_channels`."""
    xc = torch.view_as_complex(x.movedim(1, -1).contiguous())
    return xc.reshape(*batch, *xc.shape[1:])


def _validate(name: str, ndim: int, layers: int, kernel_size: int, conv: str) -> None:
    if ndim not in (2, 3):
        raise ParameterError(f"{name}: ndim must be 2 or 3, got {ndim}")
    if layers < 2:
        raise ParameterError(f"{name}: layers must be >= 2, got {layers}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ParameterError(f"{name}: kernel_size must be odd and >= 1, got {kernel_size}")
    if conv not in ("full", "separable"):
        raise ParameterError(f"{name}: conv must be 'full' or 'separable', got {conv!r}")
    if conv == "separable" and ndim != 3:
        raise ParameterError(f"{name}: conv='separable' needs ndim=3 (2D+time or 3D)")


def _conv_stack(
    ndim: int,
    cin: int,
    cout: int,
    channels: int,
    layers: int,
    kernel_size: int,
    conv: str,
    init_scale: float,
    spectral_norm: bool,
) -> nn.Sequential:
    """``layers`` convolutions ``cin → channels → … → cout`` with ReLUs between them; the last
    one's weights are multiplied by ``init_scale`` and its bias zeroed (near-zero start)."""
    k, p = kernel_size, kernel_size // 2
    widths = [cin] + [channels] * (layers - 1) + [cout]
    mods: list[nn.Module] = []
    for i in range(layers):
        ci, co = widths[i], widths[i + 1]
        if ndim == 2:
            convs = [nn.Conv2d(ci, co, k, padding=p)]
        elif conv == "full":
            convs = [nn.Conv3d(ci, co, k, padding=p)]
        else:
            convs = [
                nn.Conv3d(ci, co, (1, k, k), padding=(0, p, p)),
                nn.Conv3d(co, co, (k, 1, 1), padding=(p, 0, 0)),
            ]
        if i == layers - 1:
            with torch.no_grad():
                for c in convs[-1:]:
                    c.weight.mul_(init_scale)
                    c.bias.zero_()
        if spectral_norm:
            convs = [_spectral_norm(c) for c in convs]
        mods.extend(convs)
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class ResidualCNN(nn.Module):
    """Residual CNN denoiser ``D(x) = x + s·f(x)`` on complex images.

    Parameters
    ----------
    ndim : {2, 3}
        Number of image dimensions the denoiser acts on: 2 (2D slices) or 3 (3D volumes, or
        2D+time series ``(time, y, x)``).
    channels : int
        Feature channels of the hidden layers.
    layers : int
        Number of convolutions (>= 2); ReLU between them, none after the last.
    kernel_size : int
        Odd kernel size (zero padding keeps the image size).
    conv : {"full", "separable"}
        For ``ndim=3`` only: full 3D convolutions, or (2+1)D separable ones — a spatial
        ``1×k×k`` convolution followed by a ``k×1×1`` convolution along the first axis (time for
        2D+time data) — with fewer parameters.
    spectral_norm : bool
        Spectrally normalise every convolution (needed for the ``reversible`` memory mode).
    residual_scale : float
        Factor ``s`` on the residual branch. With spectral normalisation the default 0.5 keeps the
        branch contractive in practice (see :meth:`lipschitz_estimate`).
    init_scale : float
        Multiplies the initial weights of the last convolution; small values start the network
        near the identity, which makes unrolled training stable.
    """

    def __init__(
        self,
        ndim: int = 2,
        channels: int = 32,
        layers: int = 5,
        kernel_size: int = 3,
        conv: str = "full",
        spectral_norm: bool = False,
        residual_scale: float | None = None,
        init_scale: float = 0.1,
    ):
        super().__init__()
        _validate("ResidualCNN", ndim, layers, kernel_size, conv)
        self.ndim = ndim
        self.conv = conv
        self.spectral_norm = bool(spectral_norm)
        if residual_scale is None:
            residual_scale = 0.5 if spectral_norm else 1.0
        self.residual_scale = float(residual_scale)
        self.config = dict(
            ndim=ndim,
            channels=channels,
            layers=layers,
            kernel_size=kernel_size,
            conv=conv,
            spectral_norm=bool(spectral_norm),
            residual_scale=self.residual_scale,
            init_scale=init_scale,
        )
        self.body = _conv_stack(
            ndim, 2, 2, channels, layers, kernel_size, conv, init_scale, spectral_norm
        )

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch ``s·f(x)`` (complex in, complex out)."""
        if x.ndim < self.ndim:
            raise ShapeError(
                f"ResidualCNN(ndim={self.ndim}) needs at least {self.ndim} dimensions, got "
                f"shape {tuple(x.shape)}"
            )
        batch = x.shape[: x.ndim - self.ndim]
        h = complex_to_channels(x, self.ndim)
        w = next(self.parameters())
        out = self.body(h.to(w.dtype))
        out = channels_to_complex(out.to(h.dtype), batch)
        return out * self.residual_scale if self.residual_scale != 1.0 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)

    @property
    def invertible(self) -> bool:
        """True when built for inversion (spectral norm and a residual scale below 1)."""
        return self.spectral_norm and self.residual_scale < 1.0

    def inverse(
        self,
        z: torch.Tensor,
        tol: float = 1e-10,
        max_iter: int = 200,
        anderson: int = 0,
        x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool, float]:
        """Solve ``x + s·f(x) = z`` by fixed-point iteration ``x ← z − s·f(x)``.

        Returns ``(x, converged, relative_residual)``; the residual is
        ``‖x + s·f(x) − z‖ / ‖z‖``. Converges when ``s·f`` is a contraction; Anderson
        acceleration with memory ``anderson`` (0: plain iteration) cuts the evaluations needed,
        and ``x0`` is the starting point (default ``z``; see :func:`fixed_point_inverse`).
        """
        return fixed_point_inverse(
            self.residual, z, tol=tol, max_iter=max_iter, anderson=anderson, x0=x0
        )

    @torch.no_grad()
    def lipschitz_estimate(self, shape: Sequence[int], n_iter: int = 50, seed: int = 0) -> float:
        """Upper estimate of the Lipschitz constant of the residual branch ``s·f``.

        Product over convolutions of their operator norms on images of ``shape`` (measured by
        power iteration on ``conv`` and its transpose; ReLU is 1-Lipschitz), times ``s``.
        """
        g = torch.Generator().manual_seed(seed)
        w0 = next(self.parameters())
        bound = self.residual_scale
        for m in self.body:
            if not isinstance(m, (nn.Conv2d, nn.Conv3d)):
                continue
            weight = m.weight.detach()
            cin = weight.shape[1]
            v = torch.randn((1, cin, *shape), generator=g, dtype=w0.dtype).to(w0.device)
            fwd = nn.functional.conv2d if isinstance(m, nn.Conv2d) else nn.functional.conv3d
            tr = (
                nn.functional.conv_transpose2d
                if isinstance(m, nn.Conv2d)
                else nn.functional.conv_transpose3d
            )
            sig = 0.0
            for _ in range(n_iter):
                v = v / v.norm()
                u = fwd(v, weight, padding=m.padding)
                v = tr(u, weight, padding=m.padding)
                sig = math.sqrt(float(v.norm()))
            bound *= sig
        return bound


def checkerboard(shape: Sequence[int], parity: int = 0, dtype=torch.float32, device=None):
    """Real mask ``(*shape)`` equal to 1 where the sum of the indices has the given parity."""
    idx = torch.zeros((), dtype=torch.long, device=device)
    for ax, n in enumerate(shape):
        view = [1] * len(shape)
        view[ax] = int(n)
        idx = idx + torch.arange(int(n), device=device).view(view)
    return ((idx + parity) % 2 == 0).to(dtype)


class CouplingCNN(nn.Module):
    """Exactly invertible denoiser: checkerboard couplings of small CNNs.

    ``D = C_J ∘ … ∘ C_1``. Coupling ``j`` updates the pixels where the checkerboard ``m_j`` is 1
    (parity alternating with ``j``; both real and imaginary parts) from the others, which it
    leaves unchanged:

    * additive (default): ``C_j(x) = x + m_j ⊙ s·f_j((1 − m_j) ⊙ x)``;
    * affine (``affine=True``): ``C_j(x) = x + m_j ⊙ (x ⊙ (e^{s} − 1) + t)`` with complex
      ``(s, t) = f_j((1 − m_j) ⊙ x)``, ``Re s`` bounded to ``(−1, 1)`` by ``tanh`` — each updated
      pixel is scaled and rotated by ``e^{s}`` and shifted by ``t``, both computed from its
      neighbours (in the short training test of ``tests/learn/test_coupling.py`` this gave the
      same validation error as additive couplings: 0.3370 vs 0.3375).

    Either is inverted exactly, in one evaluation of ``f_j`` on the unchanged pixels:
    ``x_m = (y_m − t) e^{−s}`` (resp. ``y_m − s·f_j``) — no fixed-point iteration, no contraction
    or spectral normalisation needed (the coupling layers of NICE / RealNVP, as used by RevNet and
    i-RIM). With ``memory="reversible"`` or ``"hybrid"`` an :class:`UnrolledNet` uses
    :meth:`inverse_vjp`, which recovers a coupling's input and backpropagates through it with that
    same evaluation, so a reversible backward costs one extra denoiser evaluation per unroll
    instead of the ≈ 3–4 of a fixed-point inversion.

    Parameters
    ----------
    ndim : {2, 3}
        Image dimensions the denoiser acts on (3 for 3D volumes and 2D+time series).
    channels : int
        Hidden feature channels of each coupling's CNN.
    layers : int
        Convolutions per coupling (>= 2), ReLU between them.
    couplings : int
        Number of couplings ``J`` (>= 2, so that every pixel is updated).
    kernel_size : int
        Odd kernel size.
    conv : {"full", "separable"}
        For ``ndim=3``: full 3D convolutions or (2+1)D separable ones (see :class:`ResidualCNN`).
    affine : bool
        Affine couplings (scale and shift) instead of additive ones (shift only, the default).
    residual_scale : float
        Factor ``s`` of the additive couplings' shift (any value: the inverse is exact).
    init_scale : float
        Multiplies the initial weights of each coupling's last convolution (near-identity start).
    """

    exact_inverse = True
    invertible = True

    def __init__(
        self,
        ndim: int = 2,
        channels: int = 32,
        layers: int = 3,
        couplings: int = 2,
        kernel_size: int = 3,
        conv: str = "full",
        affine: bool = False,
        residual_scale: float = 1.0,
        init_scale: float = 0.1,
    ):
        super().__init__()
        _validate("CouplingCNN", ndim, layers, kernel_size, conv)
        if int(couplings) < 2:
            raise ParameterError(
                f"CouplingCNN: couplings must be >= 2 (each updates half the pixels), got {couplings}"
            )
        self.ndim = ndim
        self.affine = bool(affine)
        self.residual_scale = float(residual_scale)
        self.config = dict(
            kind="coupling",
            ndim=ndim,
            channels=channels,
            layers=layers,
            couplings=int(couplings),
            kernel_size=kernel_size,
            conv=conv,
            affine=self.affine,
            residual_scale=self.residual_scale,
            init_scale=init_scale,
        )
        cout = 4 if self.affine else 2  # (s, t) or the shift, as real/imaginary channel pairs
        self.nets = nn.ModuleList(
            _conv_stack(ndim, 2, cout, channels, layers, kernel_size, conv, init_scale, False)
            for _ in range(int(couplings))
        )
        self._masks: dict = {}

    def _mask(self, j: int, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[x.ndim - self.ndim :])
        real = x.real.dtype if x.is_complex() else x.dtype
        key = (shape, j % 2, real, x.device)
        m = self._masks.get(key)
        if m is None:
            m = checkerboard(shape, j % 2, real, x.device)
            if len(self._masks) >= 8:  # a few shapes/dtypes/devices in use: keep it small
                self._masks.clear()
            self._masks[key] = m
        return m

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < self.ndim:
            raise ShapeError(
                f"CouplingCNN(ndim={self.ndim}) needs at least {self.ndim} dimensions, got "
                f"shape {tuple(x.shape)}"
            )
        if not x.is_complex():
            raise ShapeError("CouplingCNN: the image must be a complex tensor")

    def _coefficients(self, j: int, a: torch.Tensor):
        """``(s, t)`` (affine; ``s`` None for additive) of coupling ``j`` from its input ``a``."""
        batch = a.shape[: a.ndim - self.ndim]
        h = complex_to_channels(a, self.ndim)
        w = self.nets[j][0].weight
        out = self.nets[j](h.to(w.dtype)).to(h.dtype)
        if not self.affine:
            t = channels_to_complex(out, batch)
            return None, t * self.residual_scale if self.residual_scale != 1.0 else t
        s = channels_to_complex(torch.cat([torch.tanh(out[:, :1]), out[:, 1:2]], 1), batch)
        return s, channels_to_complex(out[:, 2:], batch)

    def _couple(self, x, m, s, t):
        """The coupling's output from its input ``x`` (with autograd when ``x`` has it)."""
        if s is None:
            return x + m * t
        return x + m * (x * torch.expm1(s) + t)

    def _uncouple(self, y, m, s, t):
        if s is None:
            return y - m * t
        return y + m * ((y - t) * torch.exp(-s) - y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        for j in range(len(self.nets)):
            m = self._mask(j, x)
            s, t = self._coefficients(j, x * (1 - m))
            x = self._couple(x, m, s, t)
        return x

    def inverse(
        self,
        z: torch.Tensor,
        tol: float | None = None,
        max_iter: int | None = None,
        anderson: int = 0,
        x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool, float]:
        """Exact inverse, couplings undone in reverse order. Returns ``(x, True, 0.0)`` (the
        signature of :meth:`ResidualCNN.inverse`; ``tol``, ``max_iter``, ``anderson`` and ``x0``
        are accepted and ignored: nothing is iterated)."""
        self._check(z)
        with torch.no_grad():
            x = z
            for j in reversed(range(len(self.nets))):
                m = self._mask(j, x)
                s, t = self._coefficients(j, x * (1 - m))
                x = self._uncouple(x, m, s, t)
        return x, True, 0.0

    def inverse_vjp(
        self, z: torch.Tensor, gz: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Recover ``x = D⁻¹(z)`` and backpropagate ``gz`` through ``D`` at ``x`` in one pass.

        Returns ``(x, gx, grads)``: the input, ``gx = (∂D/∂x)ᴴ gz`` and the gradients with
        respect to ``params`` (``None`` for those ``D`` does not use). Each coupling's CNN is
        evaluated once, with autograd, on the pixels the coupling left unchanged (so on exactly
        its forward input); that evaluation gives both the inverse and the vector-Jacobian
        product.
        """
        self._check(z)
        params = list(params)
        grads: list = [None] * len(params)
        y, gy = z.detach(), gz
        for j in reversed(range(len(self.nets))):
            m = self._mask(j, y)
            a = (y * (1 - m)).requires_grad_(True)  # the coupling's input: unchanged by it
            with torch.enable_grad():
                s, t = self._coefficients(j, a)
                x = self._uncouple(y, m, s.detach() if s is not None else None, t.detach())
                xl = x.requires_grad_(True)
                out = self._couple(xl, m, s, t)
            res = torch.autograd.grad(out, [xl, a, *params], gy, allow_unused=True)
            gy = res[0] + (1 - m) * res[1]
            for i, gp in enumerate(res[2:]):
                if gp is not None:
                    grads[i] = gp if grads[i] is None else grads[i] + gp
            y = x.detach()
        return y, gy, grads


def _flat(t: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).reshape(-1)


def fixed_point_inverse(
    f,
    z: torch.Tensor,
    tol: float = 1e-10,
    max_iter: int = 200,
    anderson: int = 0,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool, float]:
    """Solve ``x + f(x) = z`` by the fixed-point iteration ``x ← z − f(x)`` (no autograd).

    Parameters
    ----------
    f : callable
        The residual branch; the iteration converges when ``f`` is a contraction.
    z : tensor
        Right-hand side (real or complex).
    tol : float
        Stop when the relative residual ``‖x + f(x) − z‖ / ‖z‖`` is at most ``tol``.
    max_iter : int
        Largest number of evaluations of ``f``.
    anderson : int
        Memory of Anderson acceleration (type II): each new iterate is the combination of the last
        ``anderson + 1`` fixed-point images ``z − f(x_i)`` whose residuals have the least-squares
        smallest combination (a small ``anderson × anderson`` solve per step, no extra evaluation
        of ``f``). ``0`` (default) gives the plain iteration. A non-finite step clears the
        history. Caveat: Anderson can converge where
        ``f`` is not a contraction, so its success does not certify that ``x + f(x)`` is
        invertible (the plain iteration's does, up to its tolerance).
    x0 : tensor, optional
        Starting point (default ``z``).

    Returns
    -------
    tuple
        ``(x, converged, relative_residual)``. Every evaluation of ``f`` is used both for the
        residual test and for the next step, so the cost is one evaluation per iteration.
    """
    x, ok, res, _ = _fixed_point(f, z, tol, max_iter, anderson, x0, graph=False)
    return x, ok, res


def _fixed_point(f, z, tol, max_iter, anderson, x0, graph):
    """Core of :func:`fixed_point_inverse`; returns ``(x, ok, res, fx)`` with ``fx = f(x)`` at
    the returned ``x``. With ``graph=True`` every evaluation runs with autograd on a fresh leaf
    ``x`` (the previous graph is dropped first) and the returned ``x``/``fx`` carry the graph of
    the last one, so a caller that needs ``f(x)`` with autograd at the solution (the MEL
    backward re-run) does not evaluate ``f`` again."""
    with torch.no_grad():
        zn = float(torch.linalg.vector_norm(_flat(z))) or 1.0
        x = z.clone() if x0 is None else x0.clone()
        res = best = math.inf
        best_it = 0
        hist_g: list[torch.Tensor] = []  # fixed-point images g_i = z − f(x_i), flattened
        hist_r: list[torch.Tensor] = []  # residuals r_i = g_i − x_i, flattened
        fx = xe = None
        for it in range(max_iter):
            fx = None  # drop the previous graph before building the next one
            if graph:
                xe = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    fx = f(xe)
            else:
                xe, fx = x, f(x)
            g = z - fx.detach()
            r = g - x
            res = float(torch.linalg.vector_norm(_flat(r))) / zn
            if not math.isfinite(res) or res <= tol:
                break
            if res < 0.5 * best:
                best, best_it = res, it
            elif res > (4 if anderson <= 0 else 1e4) * best or it - best_it > 25:
                break  # diverging or stalled: f is not a contraction here; fail fast
            if anderson <= 0:
                x = g
                continue
            hist_g.append(_flat(g).to(torch.float64))
            hist_r.append(_flat(r).to(torch.float64))
            if len(hist_g) > anderson + 1:
                hist_g.pop(0)
                hist_r.pop(0)
            if len(hist_g) == 1:
                x = g
                continue
            dr = torch.stack([b - a for a, b in zip(hist_r[:-1], hist_r[1:], strict=True)], 1)
            dg = torch.stack([b - a for a, b in zip(hist_g[:-1], hist_g[1:], strict=True)], 1)
            gram = dr.T @ dr
            reg = 1e-12 * float(gram.diagonal().sum()) + 1e-300
            gam = torch.linalg.solve(
                gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), dr.T @ hist_r[-1]
            )
            xf = hist_g[-1] - dg @ gam
            if not bool(torch.isfinite(xf).all()):
                hist_g.clear()
                hist_r.clear()
                x = g
                continue
            xf = xf.to(_flat(z).dtype)
            x = torch.view_as_complex(xf.view(*z.shape, 2)) if z.is_complex() else xf.view(z.shape)
        ok = bool(math.isfinite(res) and res <= tol)
        if graph:  # the point where f was last evaluated, with its graph
            return xe, ok, res, fx
        return x, ok, res, fx


def spectral_norm_modules(module: nn.Module) -> list[nn.Module]:
    """The spectral-norm parametrization modules inside ``module``."""
    out = []
    for m in module.modules():
        if parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                for p in plist:
                    if type(p).__name__ == "_SpectralNorm":
                        out.append(p)
    return out


__all__ = [
    "ResidualCNN",
    "CouplingCNN",
    "checkerboard",
    "complex_to_channels",
    "channels_to_complex",
    "fixed_point_inverse",
    "spectral_norm_modules",
]
