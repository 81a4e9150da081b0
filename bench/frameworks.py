"""The same training step in PyTorch (eager) and JAX (``jit(value_and_grad)``), both optional:
each ``make_*`` returns None with the reason when the framework is not installed."""
from __future__ import annotations

import numpy as np


def _import(name):
    try:
        return __import__(name), None
    except Exception as e:  # ImportError, or a broken install
        return None, f"{name} not installed ({type(e).__name__}); pip install {name}"


def make_torch(params, x, y, activation, loss, threads=None):
    """A zero-argument callable doing forward + backward in PyTorch eager mode, or (None, why).
    ``threads``: torch.set_num_threads (None keeps torch's default, one per core)."""
    torch, why = _import("torch")
    if torch is None:
        return None, why
    if threads:
        torch.set_num_threads(threads)
    ps = [torch.from_numpy(np.array(p)).requires_grad_() for p in params]
    tx = torch.from_numpy(x)
    ty = torch.from_numpy(np.asarray(y, dtype=np.int64) if loss == "xent" else y.reshape(-1, 1))
    act = torch.tanh if activation == "tanh" else torch.relu
    F = torch.nn.functional

    def step():
        for p in ps:
            p.grad = None
        h = tx
        for i in range(0, len(ps) - 2, 2):
            h = act(torch.addmm(ps[i + 1], h, ps[i]))
        z = torch.addmm(ps[-1], h, ps[-2])
        value = F.cross_entropy(z, ty) if loss == "xent" else F.mse_loss(z, ty)
        value.backward()
        return value.item(), [p.grad for p in ps]

    return step, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def make_jax(params, x, y, activation, loss):
    """A zero-argument callable running ``jit(value_and_grad(loss))`` on the CPU, or (None, why)."""
    jax, why = _import("jax")
    if jax is None:
        return None, why
    if x.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    act = jnp.tanh if activation == "tanh" else jax.nn.relu

    def loss_fn(ps, x, y):
        h = x
        for i in range(0, len(ps) - 2, 2):
            h = act(h @ ps[i] + ps[i + 1])
        z = h @ ps[-2] + ps[-1]
        if loss == "xent":
            logp = jax.nn.log_softmax(z)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        return jnp.mean((z - y.reshape(z.shape)) ** 2)

    f = jax.jit(jax.value_and_grad(loss_fn))
    cpu = jax.devices("cpu")[0]
    jps = [jax.device_put(p, cpu) for p in params]
    jx, jy = jax.device_put(x, cpu), jax.device_put(np.asarray(y, np.int32) if loss == "xent" else y, cpu)

    def step():
        value, grads = f(jps, jx, jy)
        jax.block_until_ready(grads)
        return value, grads

    return step, f"jax {jax.__version__}"
