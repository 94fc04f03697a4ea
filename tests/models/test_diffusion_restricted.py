"""GPA restricted diffusion (Van Gelderen cylinder, Murday–Cotts sphere) against independent
float64 references: the published sums in plain NumPy with roots found by scipy's brentq on the
derivative conditions and 2000 terms (no closed-form tail), the long-pulse (Neuman) and narrow-pulse
q-space limits, free diffusion at large radius, and finite differences."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.autograd.forward_ad as fwAD
from scipy.optimize import brentq

from qmrkit.errors import ParameterError, ShapeError
from qmrkit.models.diffusion import cylinder_attenuation, cylinder_deff, gpa_roots, sphere_deff
from qmrkit.models.diffusion.restricted import FULL_SUMS, gpa_deff, gpa_series, roots_needed

N_REF = 2000


@functools.lru_cache(maxsize=2)
def ref_roots(geometry: str) -> np.ndarray:
    """Roots of J1'(x) (cylinder) or j1'(x) (sphere): sign changes on a fine grid, then brentq."""
    if geometry == "cylinder":
        f = lambda x: sp.jvp(1, x)  # noqa: E731
    else:
        f = lambda x: sp.spherical_jn(1, x, derivative=True)  # noqa: E731
    grid = np.linspace(0.5, N_REF * np.pi + 2.0, 40 * N_REF)
    v = f(grid)
    i = np.nonzero(np.sign(v[:-1]) != np.sign(v[1:]))[0][:N_REF]
    return np.array([brentq(f, grid[k], grid[k + 1], xtol=1e-14, rtol=1e-15) for k in i])


def ref_deff(geometry: str, r: float, d0: float, sd: float, bd: float) -> float:
    """−ln S / b from the papers' form, summed smallest terms first (float64).

    Van Gelderen 1994 (cylinder) / Murday–Cotts 1968 (sphere):
    ln S = −2γ²G² Σ [2Dα²δ − 2 + 2e^{−Dα²δ} + 2e^{−Dα²Δ} − e^{−Dα²(Δ−δ)} − e^{−Dα²(Δ+δ)}]
                    / [D²α⁶(R²α² − κ)],   b = γ²G²δ²(Δ − δ/3).
    """
    kappa = 1.0 if geometry == "cylinder" else 2.0
    a2 = (ref_roots(geometry) / r) ** 2
    y = d0 * a2
    num = (
        2 * y * sd
        - 2
        + 2 * np.exp(-y * sd)
        + 2 * np.exp(-y * bd)
        - np.exp(-y * (bd - sd))
        - np.exp(-y * (bd + sd))
    )
    terms = num / (d0**2 * a2**3 * (r * r * a2 - kappa))
    return 2.0 * np.sum(terms[::-1]) / (sd * sd * (bd - sd / 3.0))


GEOMS = ("cylinder", "sphere")
RADII = (0.05, 0.3, 1.0, 2.5, 5.0, 10.0)
DIFFS = (0.5, 1.7, 3.0)
TIMINGS = ((1.0, 1.5), (3.0, 20.0), (8.0, 19.0), (8.0, 49.0), (20.0, 40.0), (40.0, 100.0))


def _deff(geometry, r, d0, sd, bd, dtype=torch.float64, **kw):
    return float(gpa_deff(geometry, torch.tensor(r, dtype=dtype), d0, sd, bd, **kw))


def test_roots_match_brentq():
    for g in GEOMS:
        np.testing.assert_allclose(gpa_roots(g, 300), ref_roots(g)[:300], rtol=1e-13)
    np.testing.assert_allclose(gpa_roots("cylinder", 3), [1.841183781, 5.331442774, 8.536316366])
    np.testing.assert_allclose(gpa_roots("sphere", 3), [2.081575978, 5.940369990, 9.205840145])


def test_full_sums_equal_brute_force_sums():
    """The tail constants: Σ 1/(x⁴(x²−κ)) = 7/192, 4/175 (Neuman's long-pulse laws) and
    Σ 1/(x⁶(x²−κ)), re-summed from brentq roots (the remainder beyond 2000 roots is < 1e-18)."""
    for g, kappa in (("cylinder", 1.0), ("sphere", 2.0)):
        x2 = ref_roots(g) ** 2
        s1 = np.sum((1 / (x2 * x2 * (x2 - kappa)))[::-1])
        s2 = np.sum((1 / (x2**3 * (x2 - kappa)))[::-1])
        np.testing.assert_allclose(FULL_SUMS[g], (s1, s2), rtol=1e-13)
        ser = gpa_series(g, 7)
        t1 = np.sum((1 / (x2 * x2 * (x2 - kappa)))[7:][::-1])
        t2 = np.sum((1 / (x2**3 * (x2 - kappa)))[7:][::-1])
        np.testing.assert_allclose((ser.tail1, ser.tail2), (t1, t2), rtol=1e-9)


@pytest.mark.parametrize("geometry", GEOMS)
def test_deff_equals_direct_series_float64(geometry):
    worst = 0.0
    for r in RADII:
        for d0 in DIFFS:
            for sd, bd in TIMINGS:
                got = _deff(geometry, r, d0, sd, bd)
                ref = ref_deff(geometry, r, d0, sd, bd)
                worst = max(worst, abs(got / ref - 1))
    print(f"{geometry} float64 worst relative error {worst:.2e}")
    assert worst < 1e-8, worst  # measured 4e-11 (cylinder), 6e-12 (sphere)


@pytest.mark.parametrize("geometry", GEOMS)
def test_deff_at_equal_delta_and_Delta(geometry):
    """Δ = δ: the closed-form tail drops e^{−y(Δ−δ)} = 1 terms; roots_needed then asks for
    GAP_ROOTS_CAP (30) roots or more, which keeps what is dropped below 1e-7."""
    for r, d0, sd in ((10.0, 3.0, 1.0), (10.0, 1.7, 8.0), (2.0, 0.5, 3.0)):
        np.testing.assert_allclose(
            _deff(geometry, r, d0, sd, sd), ref_deff(geometry, r, d0, sd, sd), rtol=1e-7
        )  # measured 9e-11


@pytest.mark.parametrize("geometry", GEOMS)
def test_deff_float32(geometry):
    worst = 0.0
    for r in RADII:
        for d0 in DIFFS:
            for sd, bd in TIMINGS:
                got = _deff(geometry, r, d0, sd, bd, dtype=torch.float32)
                worst = max(worst, abs(got / ref_deff(geometry, r, d0, sd, bd) - 1))
    print(f"{geometry} float32 worst relative error {worst:.2e}")
    assert worst < 2e-6, worst  # measured ≈ 5e-7 (a few float32 ulps)


def test_vector_timings_and_shapes():
    r = torch.tensor([[1.0], [4.0], [9.0]], dtype=torch.float64)
    sd, bd = np.array([8.0, 8.0, 3.0]), np.array([19.0, 49.0, 30.0])
    out = cylinder_deff(r, 1.7, sd, bd)
    assert out.shape == (3, 3) and out.dtype == torch.float64
    ref = [
        [ref_deff("cylinder", float(ri), 1.7, s, b) for s, b in zip(sd, bd, strict=True)]
        for ri in r[:, 0]
    ]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10)
    b = np.array([1.0, 6.0, 17.8])
    att = cylinder_attenuation(b, r, 1.7, sd, bd)
    np.testing.assert_allclose(att.numpy(), np.exp(-b * np.array(ref)), rtol=1e-10)


@pytest.mark.parametrize("geometry, c1", [("cylinder", 7.0 / 48.0), ("sphere", 16.0 / 175.0)])
def test_small_radius_neuman_limit(geometry, c1):
    """Long pulses / small R: −ln S = c·γ²G²R⁴δ/D0 (Neuman 1974: 7/48 cylinder, 16/175 sphere),
    i.e. D_eff = c·R⁴/(D0·δ·(Δ − δ/3)), with a relative correction O(R²/(D0·δ))."""
    d0, sd, bd = 2.0, 10.0, 30.0
    for r in (0.02, 0.05, 0.1):
        lead = c1 * r**4 / (d0 * sd * (bd - sd / 3))
        rel = _deff(geometry, r, d0, sd, bd) / lead - 1
        # the next term is −(S₂/S₁)·R²/(D0δ) with S₂/S₁ = 0.29 (cyl), 0.23 (sphere)
        assert -0.35 * r * r / (d0 * sd) < rel < 0, (r, rel)
    # R⁴ scaling
    a, b = _deff(geometry, 0.01, d0, sd, bd), _deff(geometry, 0.02, d0, sd, bd)
    np.testing.assert_allclose(b / a, 16.0, rtol=1e-5)


@pytest.mark.parametrize("geometry", GEOMS)
def test_narrow_pulse_long_time_q_space_limit(geometry):
    """δ → 0, Δ ≫ R²/D0: the exact narrow-pulse signal is the squared form factor,
    E = [2J₁(qR)/(qR)]² (cylinder) or [3j₁(qR)/(qR)]² (sphere), with q² = b/(Δ − δ/3); at small
    qR its −ln E/q² is R²/4 resp. R²/5 (+O(q²R⁴)), which the GPA must reproduce."""
    r, d0 = 2.0, 2.0
    sd = 2e-7  # D0·δ/R² = 1e-7: finite-pulse correction ≈ 1.3e-7 relative
    bd = 2000.0  # e^{−x₁²D0Δ/R²} = 0
    qr = 1e-3
    if geometry == "cylinder":
        e = (2 * sp.j1(qr) / qr) ** 2
    else:
        e = (3 * sp.spherical_jn(1, qr) / qr) ** 2
    q2 = (qr / r) ** 2
    expected = -np.log(e) / q2  # = −ln S/q² = D_eff·(Δ − δ/3)
    got = _deff(geometry, r, d0, sd, bd) * (bd - sd / 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("geometry", GEOMS)
def test_free_diffusion_limit(geometry):
    """R → ∞: D_eff → D0, the deficit falling like the surface-to-volume ratio, 1/R."""
    d0, sd, bd = 2.0, 10.0, 30.0
    deficit = [1 - _deff(geometry, r, d0, sd, bd) / d0 for r in (1000.0, 3000.0)]
    assert 0 < deficit[1] < deficit[0] < 0.02
    np.testing.assert_allclose(deficit[0] / deficit[1], 3.0, rtol=0.01)  # measured 3.005


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("geometry", GEOMS)
def test_gradients_match_finite_differences(geometry):
    sd, bd = np.array([8.0, 3.0]), np.array([19.0, 49.0])
    r0 = torch.tensor([[0.7], [3.0], [9.0]], dtype=torch.float64)
    d0 = torch.tensor([[1.7], [1.0], [3.0]], dtype=torch.float64)

    def f(r, d):
        return gpa_deff(geometry, r, d, sd, bd, n_roots=12)

    r = r0.clone().requires_grad_(True)
    d = d0.clone().requires_grad_(True)
    gr, gd = torch.autograd.grad(f(r, d).sum(), (r, d))
    h = 1e-5
    fd_r = ((f(r0 * (1 + h), d0) - f(r0 * (1 - h), d0)) / (2 * h * r0)).sum(-1, keepdim=True)
    fd_d = ((f(r0, d0 * (1 + h)) - f(r0, d0 * (1 - h))) / (2 * h * d0)).sum(-1, keepdim=True)
    np.testing.assert_allclose(gr.numpy(), fd_r.numpy(), rtol=1e-7)
    np.testing.assert_allclose(gd.numpy(), fd_d.numpy(), rtol=1e-7)
    with fwAD.dual_level():  # fit.lm takes Jacobians in forward mode
        out = fwAD.unpack_dual(f(fwAD.make_dual(r0, torch.ones_like(r0)), d0))
        tangent = out.tangent.sum(-1, keepdim=True).numpy()
    np.testing.assert_allclose(tangent, gr.numpy(), rtol=1e-12)


def test_roots_needed_and_explicit_root_count():
    # Fan 2020 protocol, a ≤ 20 µm: few roots reach the e^{−40} criterion
    n = roots_needed("cylinder", 10.0, 1.7, 8.0, 11.0)
    assert 2 <= n <= 8
    # more explicit roots do not change the result beyond rounding
    for g in GEOMS:
        a = _deff(g, 6.0, 1.7, 8.0, 19.0)
        b = _deff(g, 6.0, 1.7, 8.0, 19.0, n_roots=200)
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_bad_inputs():
    with pytest.raises(ParameterError, match="radius"):
        cylinder_deff(torch.tensor([-1.0, 2.0]), 1.7, 8.0, 19.0)
    with pytest.raises(ParameterError, match="radius"):
        sphere_deff(0.0, 1.7, 8.0, 19.0)
    with pytest.raises(ParameterError, match="diffusivity"):
        sphere_deff(3.0, -1.0, 8.0, 19.0)
    with pytest.raises(ParameterError, match="big_delta"):
        cylinder_deff(3.0, 1.7, 8.0, 5.0)
    with pytest.raises(ParameterError, match="small_delta"):
        cylinder_deff(3.0, 1.7, 0.0, 5.0)
    with pytest.raises(ShapeError, match="broadcast"):
        cylinder_deff(3.0, 1.7, [8.0, 8.0], [19.0, 49.0, 30.0])
    with pytest.raises(ParameterError, match="geometry"):
        gpa_deff("ellipsoid", 3.0, 1.7, 8.0, 19.0)
    with pytest.raises(ParameterError, match="n_roots"):
        gpa_series("sphere", -1)


def test_broadcasting_of_radius_and_timings():
    sd, bd = np.array([8.0, 8.0]), np.array([19.0, 49.0])
    scalar = cylinder_deff(torch.tensor(3.0, dtype=torch.float64), 1.7, sd, bd)
    assert scalar.shape == (2,)
    col = cylinder_deff(torch.tensor([[3.0], [5.0]], dtype=torch.float64), 1.7, sd, bd)
    assert col.shape == (2, 2)
    np.testing.assert_allclose(col[0].numpy(), scalar.numpy(), rtol=1e-15)
    assert cylinder_deff(torch.tensor([3.0, 5.0, 6.0]), 1.7, 8.0, 19.0).shape == (3,)
    with pytest.raises(ShapeError, match="broadcast"):
        cylinder_deff(torch.tensor([3.0, 5.0, 6.0]), 1.7, sd, bd)
