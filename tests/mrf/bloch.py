"""An independent isochromat Bloch simulation of spoiled FISP (NumPy float64), for EPG tests.

N isochromats spread uniformly over one cycle of dephasing; the unbalanced gradient of each TR
rotates isochromat j by 2π·j/N about z. Averaging their transverse magnetisation gives the echo.
With N larger than twice the number of TRs the discrete average equals the continuous one exactly
(no aliasing of dephasing orders), so EPG and this simulation must agree to rounding.
"""

import numpy as np


def rot_x_phase(alpha, phi):
    """Rotation by alpha about the axis (cos phi, sin phi, 0) (right-handed)."""
    ux, uy = np.cos(phi), np.sin(phi)
    c, s = np.cos(alpha), np.sin(alpha)
    return np.array(
        [
            [c + ux * ux * (1 - c), ux * uy * (1 - c), uy * s],
            [uy * ux * (1 - c), c + uy * uy * (1 - c), -ux * s],
            [-uy * s, ux * s, c],
        ]
    )


def bloch_fisp(flip_deg, tr, te, phase_deg, t1, t2, b1=1.0, inversion=True, ti=20.0, n_iso=None):
    n_tr = len(flip_deg)
    n_iso = n_iso or 2 * n_tr + 8
    theta = 2 * np.pi * np.arange(n_iso) / n_iso
    m = np.zeros((n_iso, 3))
    m[:, 2] = 1.0
    if inversion:
        m[:, 2] = -1.0
        e1 = np.exp(-ti / t1)
        m[:, 2] = m[:, 2] * e1 + (1 - e1)
    out = np.empty(n_tr, dtype=complex)

    def relax(m, tau):
        e1, e2 = np.exp(-tau / t1), np.exp(-tau / t2)
        m[:, :2] *= e2
        m[:, 2] = m[:, 2] * e1 + (1 - e1)
        return m

    for i in range(n_tr):
        R = rot_x_phase(np.deg2rad(flip_deg[i]) * b1, np.deg2rad(phase_deg[i]))
        m = m @ R.T
        m = relax(m, te[i])
        out[i] = np.mean(m[:, 0] + 1j * m[:, 1])
        m = relax(m, tr[i] - te[i])
        c, s = np.cos(theta), np.sin(theta)
        mx, my = m[:, 0].copy(), m[:, 1].copy()
        m[:, 0] = c * mx - s * my
        m[:, 1] = s * mx + c * my
    return out
