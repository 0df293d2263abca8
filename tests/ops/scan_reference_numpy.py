"""An independent float64 numpy loop of the selective scan, the check on `impl="reference"` itself."""
import numpy as np


def numpy_selective_scan(u, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         initial_state=None, seq_idx=None):
    f = lambda x: None if x is None else np.asarray(x, np.float64)
    u, dt, A, B, C, D, z, dt_bias, h = map(f, (u, dt, A, B, C, D, z, dt_bias, initial_state))
    b, l, d = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    g = B.shape[2]
    B = np.repeat(B, d // g, axis=2)  # (b, l, d, n)
    C = np.repeat(C, d // g, axis=2)
    dt = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        dt = np.log1p(np.exp(dt))
    h = np.zeros((b, d, n)) if h is None else h.copy()
    y = np.zeros((b, l, d))
    for t in range(l):
        for i in range(b):
            if seq_idx is not None and t > 0 and seq_idx[i, t] != seq_idx[i, t - 1]:
                h[i] = 0.0
            h[i] = np.exp(dt[i, t, :, None] * A) * h[i] + (dt[i, t] * u[i, t])[:, None] * B[i, t]
            y[i, t] = (h[i] * C[i, t]).sum(-1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * z / (1 + np.exp(-z))
    return y, h
