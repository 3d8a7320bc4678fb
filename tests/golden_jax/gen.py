#!/usr/bin/env python
"""Random golden-case generator for dlc, with JAX (float64) as the reference.

usage: gen.py [--seed S] [--out DIR] [--only FAMILY,...]
Each case: DIR/<family>/<name>/{model.dl, inputs.safetensors, params.safetensors, expected.safetensors}

The reference of every op follows LANGUAGE.md's formulas, written here
independently of dlc (ties split equally, max-pool gradients to the first
maximum, avg-pool over the real cells, the LSTM/GRU loops, multi-head
self-attention), evaluated in float64 with jax.value_and_grad and stored as
float32. tests/golden_jax/cases was written by `gen.py --seed 1` (jax 0.10.2,
numpy 2.x; needs `pip install jax numpy safetensors`), and tests/golden.rs
runs `dlc test` on it with both backends. --out is deleted and rewritten.
"""
import os, sys, shutil, argparse
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platform_name", "cpu")
import jax.numpy as jnp
from jax import lax
from safetensors.numpy import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases"))
ap.add_argument("--only", default=None, help="comma-separated families")
args = ap.parse_args()
R = np.random.default_rng(args.seed)

CASES = []


def shp(s):
    return "[" + ", ".join(str(d) for d in s) + "]"


def f32(*shape, lo=None, hi=None, std=1.0):
    if lo is not None:
        return R.uniform(lo, hi, size=shape).astype(np.float32)
    return (R.normal(size=shape) * std).astype(np.float32)


def i32(arr):
    return np.asarray(arr, dtype=np.int32)


class Case:
    def __init__(self, family, name, src, params, inputs, fn, loss=True, toml=None):
        self.family, self.name, self.src = family, name, src
        self.params, self.inputs, self.fn, self.toml = params, inputs, fn, toml


def add(family, name, body, params, inputs, fn, toml=None):
    """body: statements of the model (lines). fn(P, I) -> (outputs dict, loss)"""
    lines = []
    for k, v in params.items():
        if "." in k:
            continue  # created by a std layer
        lines.append(f"param {k}: f32{shp(v.shape)}")
    for k, v in inputs.items():
        t = "i32" if v.dtype == np.int32 else "f32"
        lines.append(f"input {k}: {t}{shp(v.shape)}")
    src = f"model m_{family}_{name} {{\n" + "".join("    " + l + "\n" for l in lines + body) + "}\n"
    CASES.append(Case(family, name, src, params, inputs, fn, toml=toml))


def add_raw(family, name, src, params, inputs, fn, toml=None):
    CASES.append(Case(family, name, src, params, inputs, fn, toml=toml))


def to64(d):
    return {k: (jnp.asarray(v, dtype=jnp.float64) if v.dtype == np.float32 else jnp.asarray(v)) for k, v in d.items()}


def write(case, root):
    d = os.path.join(root, case.family, case.name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    P = to64(case.params)
    I = to64(case.inputs)
    def lf(p):
        o, l = case.fn(p, I)
        return l, o
    (loss, outs), g = jax.value_and_grad(lf, has_aux=True)(P)
    exp = {k: np.asarray(v, dtype=np.float32) for k, v in outs.items()}
    exp["loss"] = np.asarray(loss, dtype=np.float32)
    for k, v in g.items():
        exp["grad." + k] = np.asarray(v, dtype=np.float32)
    for k, v in exp.items():
        assert np.all(np.isfinite(v)), (case.family, case.name, k)
    with open(os.path.join(d, "model.dl"), "w") as f:
        f.write(case.src)
    save_file({k: np.array(v, copy=True, order='C') for k, v in case.inputs.items()}, os.path.join(d, "inputs.safetensors"))
    if case.params:
        save_file({k: np.array(v, copy=True, order='C') for k, v in case.params.items()}, os.path.join(d, "params.safetensors"))
    save_file({k: np.array(v, copy=True, order='C') for k, v in exp.items()}, os.path.join(d, "expected.safetensors"))
    if case.toml:
        with open(os.path.join(d, "case.toml"), "w") as f:
            f.write(case.toml)


def rshape(rank, lo=1, hi=5):
    return tuple(int(R.integers(lo, hi + 1)) for _ in range(rank))


# --------------------------------------------------------------------------- helpers (reference math)
def relu(x):
    return jnp.where(x > 0, x, 0.0)


def jabs(x):
    return jnp.where(x > 0, x, jnp.where(x < 0, -x, 0.0 * x))


def emax(a, b):  # maximum with equal split on ties
    a, b = jnp.broadcast_arrays(a, b)
    return jnp.where(a > b, a, jnp.where(a < b, b, 0.5 * (a + b)))


def emin(a, b):
    a, b = jnp.broadcast_arrays(a, b)
    return jnp.where(a < b, a, jnp.where(a > b, b, 0.5 * (a + b)))


def norm_axes(axis, rank):
    if axis is None:
        return tuple(range(rank))
    if isinstance(axis, int):
        axis = [axis]
    return tuple(sorted(a % rank for a in axis))


def rmax(x, axis, keepdims):  # max reduction with equal split on ties
    ax = norm_axes(axis, x.ndim)
    m = lax.stop_gradient(jnp.max(x, axis=ax, keepdims=True))
    mask = (x == m).astype(x.dtype)
    cnt = jnp.sum(mask, axis=ax, keepdims=True)
    return jnp.sum(x * mask / cnt, axis=ax, keepdims=keepdims)


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def softmax(x, axis=-1):
    m = lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    e = jnp.exp(x - m)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    m = lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return x - m - jnp.log(jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True))


def conv_ref(x, w, stride=1, pad=0, dil=1):
    kh, kw = w.shape[2], w.shape[3]
    if pad == "same":
        th, tw = dil * (kh - 1), dil * (kw - 1)
        padding = [(th // 2, th - th // 2), (tw // 2, tw - tw // 2)]
    else:
        padding = [(pad, pad), (pad, pad)]
    return lax.conv_general_dilated(x, w, (stride, stride), padding, rhs_dilation=(dil, dil),
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                    precision=lax.Precision.HIGHEST)


def pool_idx(H, win, stride, pad):
    OH = (H + 2 * pad - win) // stride + 1
    return np.array([[o * stride + k for k in range(win)] for o in range(OH)]), OH  # indices into padded


def pool_patches(x, win, stride, pad, fill):
    N, C, H, W = x.shape
    ri, OH = pool_idx(H, win, stride, pad)
    ci, OW = pool_idx(W, win, stride, pad)
    xp = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    p = xp[:, :, ri[:, None, :, None], ci[None, :, None, :]]  # N C OH OW win win
    return p.reshape(N, C, OH, OW, win * win), ri, ci, H, W


def max_pool_ref(x, win, stride, pad):
    p, *_ = pool_patches(x, win, stride, pad, -jnp.inf)
    idx = jnp.argmax(lax.stop_gradient(p), axis=-1)  # first maximum
    return jnp.take_along_axis(p, idx[..., None], axis=-1)[..., 0]


def avg_pool_ref(x, win, stride, pad):
    p, ri, ci, H, W = pool_patches(x, win, stride, pad, 0.0)
    rv = ((ri - pad >= 0) & (ri - pad < H)).sum(-1)
    cv = ((ci - pad >= 0) & (ci - pad < W)).sum(-1)
    cnt = rv[:, None] * cv[None, :]
    return p.sum(-1) / cnt


def attention_ref(q, k, v, causal=False, scale=None):
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    s = jnp.einsum("...id,...jd->...ij", q, k) * scale
    if causal:
        Tq, Tk = s.shape[-2], s.shape[-1]
        mask = np.arange(Tk)[None, :] > np.arange(Tq)[:, None]
        s = jnp.where(mask, -jnp.inf, s)
    return jnp.einsum("...ij,...jd->...id", softmax(s, -1), v)


def lstm_ref(x, wx, wh, b):
    N, T, F = x.shape
    H = wh.shape[0]
    h = jnp.zeros((N, H))
    c = jnp.zeros((N, H))
    out = []
    for t in range(T):
        z = x[:, t] @ wx + h @ wh + b
        i, f, g, o = sigmoid(z[:, :H]), sigmoid(z[:, H:2 * H]), jnp.tanh(z[:, 2 * H:3 * H]), sigmoid(z[:, 3 * H:])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        out.append(h)
    return jnp.stack(out, 1)


def gru_ref(x, wx, wh, b):
    N, T, F = x.shape
    H = wh.shape[0]
    h = jnp.zeros((N, H))
    out = []
    for t in range(T):
        xt = x[:, t]
        z = sigmoid(xt @ wx[:, :H] + h @ wh[:, :H] + b[:H])
        r = sigmoid(xt @ wx[:, H:2 * H] + h @ wh[:, H:2 * H] + b[H:2 * H])
        hh = jnp.tanh(xt @ wx[:, 2 * H:] + (r * h) @ wh[:, 2 * H:] + b[2 * H:])
        h = (1 - z) * h + z * hh
        out.append(h)
    return jnp.stack(out, 1)


def sumdy(y, dy):
    return jnp.sum(y * dy)


# --------------------------------------------------------------------------- families
def fam_unary():
    ops = {
        "relu": relu, "sigmoid": sigmoid, "tanh": jnp.tanh, "exp": jnp.exp, "log": jnp.log,
        "sqrt": jnp.sqrt, "abs": jabs, "neg": lambda x: -x,
    }
    for opn, f in ops.items():
        for rep in range(2):
            s = rshape(int(R.integers(1, 4)))
            if opn in ("log", "sqrt"):
                x = f32(*s, lo=0.2, hi=3.0)
            else:
                x = f32(*s)
                if opn in ("relu", "abs"):
                    x.reshape(-1)[:: 3] = 0.0  # kinks: derivative 0
            dy = f32(*s)
            form = [f"{opn}(x)", f"x |> {opn}"][rep]
            if opn == "neg" and rep == 1:
                form = "-x"
            add("unary", f"{opn}_{rep}", [f"output y = {form}", "loss = sum(y * dy)"],
                {"x": x}, {"dy": dy}, lambda P, I, f=f: ({"y": f(P["x"])}, sumdy(f(P["x"]), I["dy"])))
    # a composite chain
    s = rshape(2)
    x = f32(*s)
    dy = f32(*s)
    g = lambda x: jnp.sqrt(jnp.exp(jnp.tanh(x)) + sigmoid(-x)) * jabs(relu(x) - 0.5)
    add("unary", "chain", ["output y = sqrt(exp(tanh(x)) + sigmoid(neg(x))) * abs(relu(x) - 0.5)", "loss = sum(y * dy)"],
        {"x": x}, {"dy": dy}, lambda P, I: ({"y": g(P["x"])}, sumdy(g(P["x"]), I["dy"])))


def bcast_pair():
    out = rshape(int(R.integers(1, 4)), 1, 4)
    def sub(s):
        r = int(R.integers(0, len(s) + 1))
        s2 = list(s[len(s) - r:])
        for i in range(len(s2)):
            if R.random() < 0.3:
                s2[i] = 1
        return tuple(s2)
    a = sub(out) if R.random() < 0.5 else out
    b = sub(out)
    if R.random() < 0.5:
        a, b = b, a
    return a, b, tuple(np.broadcast_shapes(a, b))


def fam_minmax():
    for i in range(12):
        op = ["maximum", "minimum"][i % 2]
        ref = emax if op == "maximum" else emin
        if i >= 10:
            # scalar literal operand with exact ties
            s = rshape(2)
            a = np.round(f32(*s) * 2) / 2
            a = a.astype(np.float32)
            a.reshape(-1)[::2] = 0.5
            dy = f32(*s)
            add("minmax", f"{op}_lit_{i}", [f"output y = {op}(a, 0.5)", "loss = sum(y * dy)"], {"a": a}, {"dy": dy},
                lambda P, I, ref=ref: ({"y": ref(P["a"], 0.5)}, sumdy(ref(P["a"], 0.5), I["dy"])))
            continue
        sa, sb, so = bcast_pair()
        a = f32(*sa) if len(sa) else np.float32(R.normal()).reshape(())
        b = f32(*sb) if len(sb) else np.float32(R.normal()).reshape(())
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        # deliberate ties: copy some of b into a where a is not broadcast
        if a.shape == so and i % 3 != 2:
            bb = np.broadcast_to(b, so)
            m = R.random(so) < 0.4
            a = np.where(m, bb, a).astype(np.float32)
        elif b.shape == so and i % 3 != 2:
            aa = np.broadcast_to(a, so)
            m = R.random(so) < 0.4
            b = np.where(m, aa, b).astype(np.float32)
        dy = f32(*so)
        add("minmax", f"{op}_{i}", [f"output y = {op}(a, b)", "loss = sum(y * dy)"], {"a": a, "b": b}, {"dy": dy},
            lambda P, I, ref=ref: ({"y": ref(P["a"], P["b"])}, sumdy(ref(P["a"], P["b"]), I["dy"])))


def fam_softmax():
    for i in range(10):
        op = ["softmax", "log_softmax"][i % 2]
        ref = softmax if op == "softmax" else log_softmax
        r = int(R.integers(1, 4))
        s = rshape(r, 1, 5)
        x = f32(*s, std=3.0)
        if i == 8:
            x = x + 80.0  # large magnitude
        dy = f32(*s)
        if i < 2:
            ax = None
            call = f"{op}(x)"
            axv = -1
        else:
            axv = int(R.integers(-r, r))
            call = f"{op}(x, axis={axv})" if i % 3 else f"x |> {op}(axis={axv})"
        add("softmax", f"{op}_{i}", [f"output y = {call}", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
            lambda P, I, ref=ref, axv=axv: ({"y": ref(P["x"], axv)}, sumdy(ref(P["x"], axv), I["dy"])))


def fam_reduce():
    for i in range(14):
        op = ["sum", "mean", "max"][i % 3]
        r = int(R.integers(1, 5))
        s = rshape(r, 1, 4)
        if op == "max":
            x = (R.integers(-3, 4, size=s)).astype(np.float32) * 0.5  # many ties
            if i % 2:
                x = x + f32(*s) * 0.01 * (R.random(s) < 0.5)
                x = x.astype(np.float32)
        else:
            x = f32(*s)
        choice = R.integers(0, 4)
        kd = bool(R.integers(0, 2))
        if choice == 0:
            axis = None
        elif choice == 1:
            axis = int(R.integers(-r, r))
        else:
            k = int(R.integers(1, r + 1))
            axs = sorted(R.choice(r, size=k, replace=False).tolist())
            axis = [a - r if R.random() < 0.4 else a for a in axs]
            if R.random() < 0.3:
                axis = axis[::-1]
        argstr = ""
        if axis is not None:
            argstr += f", axis={axis}" if isinstance(axis, int) else ", axis=[" + ", ".join(map(str, axis)) + "]"
        if kd or axis is None and i % 4 == 0:
            argstr += f", keepdims={'true' if kd else 'false'}"
        if op == "sum":
            f = lambda x, axis=axis, kd=kd: jnp.sum(x, axis=norm_axes(axis, x.ndim), keepdims=kd)
        elif op == "mean":
            f = lambda x, axis=axis, kd=kd: jnp.mean(x, axis=norm_axes(axis, x.ndim), keepdims=kd)
        else:
            f = lambda x, axis=axis, kd=kd: rmax(x, axis, kd)
        yshape = np.asarray(f(jnp.asarray(x, jnp.float64))).shape
        dy = f32(*yshape) if yshape else np.float32(R.normal()).reshape(())
        dy = np.asarray(dy, np.float32)
        add("reduce", f"{op}_{i}", [f"output y = {op}(x{argstr})", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
            lambda P, I, f=f: ({"y": f(P["x"])}, sumdy(f(P["x"]), I["dy"])))


def fam_matmul():
    M, K, N, B, C = [int(R.integers(1, 10)) for _ in range(5)]
    B, C = min(B, 4), min(C, 4)
    B = max(B, 2)
    forms = [
        ((M, K), (K, N)), ((B, M, K), (K, N)), ((M, K), (B, K, N)), ((B, 1, M, K), (C, K, N)),
        ((K,), (K, N)), ((M, K), (K,)), ((K,), (K,)), ((B, M, K), (K,)), ((K,), (B, K, N)),
        ((B, M, K), (B, K, N)), ((1, M, K), (B, K, N)),
    ]
    for i, (sa, sb) in enumerate(forms):
        a, b = f32(*sa), f32(*sb)
        ys = np.matmul(a, b).shape
        dy = np.asarray(f32(*ys) if ys else np.float32(R.normal()).reshape(()), np.float32)
        expr = "a @ b" if i % 2 == 0 else "matmul(a, b)"
        add("matmul", f"form_{i}", [f"output y = {expr}", "loss = sum(y * dy)"], {"a": a, "b": b}, {"dy": dy},
            lambda P, I: ({"y": jnp.matmul(P["a"], P["b"], precision="highest")},
                          sumdy(jnp.matmul(P["a"], P["b"], precision="highest"), I["dy"])))


def fam_shape():
    # transpose
    for i in range(5):
        r = int(R.integers(2, 5))
        s = rshape(r, 1, 4)
        x = f32(*s)
        if i == 0:
            perm = None
            call = "transpose(x)"
            pv = list(range(r - 2)) + [r - 1, r - 2]
        else:
            pv = R.permutation(r).tolist()
            call = "transpose(x, [" + ", ".join(map(str, pv)) + "])"
        ys = tuple(s[p] for p in pv)
        dy = f32(*ys)
        add("shape", f"transpose_{i}", [f"output y = {call}", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
            lambda P, I, pv=pv: ({"y": jnp.transpose(P["x"], pv)}, sumdy(jnp.transpose(P["x"], pv), I["dy"])))
    # reshape
    for i in range(5):
        s = rshape(int(R.integers(1, 4)), 1, 4)
        n = int(np.prod(s))
        # random factorisation of n
        fac = []
        rem = n
        for _ in range(int(R.integers(1, 4))):
            divs = [d for d in range(1, rem + 1) if rem % d == 0]
            d = int(R.choice(divs))
            fac.append(d)
            rem //= d
        fac.append(rem)
        tgt = list(fac)
        j = int(R.integers(0, len(tgt)))
        tgt_s = [str(v) for v in tgt]
        tgt_s[j] = "-1"
        x = f32(*s)
        dy = f32(*tgt)
        add("shape", f"reshape_{i}", [f"output y = reshape(x, [{', '.join(tgt_s)}])", "loss = sum(y * dy)"],
            {"x": x}, {"dy": dy},
            lambda P, I, tgt=tgt: ({"y": jnp.reshape(P["x"], tgt)}, sumdy(jnp.reshape(P["x"], tgt), I["dy"])))
    # flatten
    s = rshape(4, 1, 4)
    x = f32(*s)
    dy = f32(s[0], int(np.prod(s[1:])))
    add("shape", "flatten", ["output y = flatten(x)", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
        lambda P, I: ({"y": P["x"].reshape(P["x"].shape[0], -1)}, sumdy(P["x"].reshape(P["x"].shape[0], -1), I["dy"])))
    # concat
    for i in range(5):
        r = int(R.integers(1, 4))
        base = rshape(r, 1, 4)
        ax = int(R.integers(-r, r))
        k = int(R.integers(2, 4))
        ops = []
        for _ in range(k):
            s = list(base)
            s[ax] = int(R.integers(1, 4))
            ops.append(f32(*s))
        names = [f"x{j}" for j in range(k)]
        ys = np.concatenate(ops, ax).shape
        dy = f32(*ys)
        add("shape", f"concat_{i}", [f"output y = concat([{', '.join(names)}], {ax})", "loss = sum(y * dy)"],
            dict(zip(names, ops)), {"dy": dy},
            lambda P, I, names=names, ax=ax: ({"y": jnp.concatenate([P[n] for n in names], ax)},
                                               sumdy(jnp.concatenate([P[n] for n in names], ax), I["dy"])))
    # slice
    sl_i = 0
    tries = 0
    while sl_i < 8 and tries < 1000:
        tries += 1
        r = int(R.integers(1, 4))
        s = rshape(r, 2, 6)
        ax = int(R.integers(-r, r))
        L = s[ax]
        st = int(R.integers(-L - 3, L + 3))
        en = int(R.integers(-L - 3, L + 4))
        idx = [slice(None)] * r
        idx[ax] = slice(st, en)
        x = f32(*s)
        ys = x[tuple(idx)].shape
        if 0 in ys:
            continue
        # want a mix of negative / out-of-range
        if sl_i < 6 and not (st < 0 or en < 0 or en > L or st < -L):
            continue
        dy = f32(*ys)
        add("shape", f"slice_{sl_i}", [f"output y = slice(x, {ax}, {st}, {en})", "loss = sum(y * dy)"],
            {"x": x}, {"dy": dy},
            lambda P, I, idx=tuple(idx): ({"y": P["x"][idx]}, sumdy(P["x"][idx], I["dy"])))
        sl_i += 1
    # last
    for i in range(2):
        s = (int(R.integers(1, 4)), int(R.integers(1, 6)), int(R.integers(1, 5)))
        x = f32(*s)
        dy = f32(s[0], s[2])
        add("shape", f"last_{i}", ["output y = last(x)" if i == 0 else "output y = x |> last", "loss = sum(y * dy)"],
            {"x": x}, {"dy": dy}, lambda P, I: ({"y": P["x"][:, -1]}, sumdy(P["x"][:, -1], I["dy"])))


def fam_conv():
    n = 0
    while n < 14:
        N, C, O = int(R.integers(1, 3)), int(R.integers(1, 5)), int(R.integers(1, 9))
        H, W = int(R.integers(3, 10)), int(R.integers(3, 10))
        KH = int(R.integers(1, 5))
        KW = KH if R.random() < 0.6 else int(R.integers(1, 5))
        same = n >= 9
        if same:
            stride = 1
            dil = int(R.integers(1, 3))
            pad = "same"
            if n in (9, 10):
                KH = KW = [2, 4][n - 9]  # even kernels
        else:
            stride, pad, dil = int(R.integers(1, 4)), int(R.integers(0, 3)), int(R.integers(1, 3))
        p = 0 if pad == "same" else pad
        if pad != "same":
            OH = (H + 2 * p - dil * (KH - 1) - 1) // stride + 1
            OW = (W + 2 * p - dil * (KW - 1) - 1) // stride + 1
            if OH < 1 or OW < 1:
                continue
        x = f32(N, C, H, W)
        w = f32(O, C, KH, KW, std=0.5)
        ys = np.asarray(conv_ref(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64), stride, pad, dil)).shape
        dy = f32(*ys)
        kw = []
        if stride != 1 or R.random() < 0.2:
            kw.append(f"stride={stride}")
        if pad == "same":
            kw.append('pad="same"')
        elif pad != 0 or R.random() < 0.2:
            kw.append(f"pad={pad}")
        if dil != 1 or R.random() < 0.2:
            kw.append(f"dilation={dil}")
        call = "conv(x, w" + "".join(", " + k for k in kw) + ")"
        add("conv", f"conv_{n}", [f"output y = {call}", "loss = sum(y * dy)"], {"x": x, "w": w}, {"dy": dy},
            lambda P, I, stride=stride, pad=pad, dil=dil: (
                {"y": conv_ref(P["x"], P["w"], stride, pad, dil)},
                sumdy(conv_ref(P["x"], P["w"], stride, pad, dil), I["dy"])))
        n += 1


def fam_pool():
    n = 0
    while n < 16:
        op = ["max_pool2d", "avg_pool2d"][n % 2]
        N, C = int(R.integers(1, 3)), int(R.integers(1, 3))
        H, W = int(R.integers(2, 10)), int(R.integers(2, 10))
        win = int(R.integers(1, 5))
        stride = win if n < 4 else int(R.integers(1, 4))
        if n >= 4 and stride == win:
            stride = 1 if win != 1 else 2
        pad = int(R.integers(0, win)) if n >= 2 else 0
        OH = (H + 2 * pad - win) // stride + 1
        OW = (W + 2 * pad - win) // stride + 1
        if OH < 1 or OW < 1:
            continue
        if op == "max_pool2d":
            x = (R.integers(-2, 3, size=(N, C, H, W))).astype(np.float32)  # heavy ties
            if n % 4 == 3:
                x = x - 5.0  # all negative: padding must not win
            if n % 8 == 1:
                x = f32(N, C, H, W)
            ref = max_pool_ref
        else:
            x = f32(N, C, H, W)
            ref = avg_pool_ref
        kw = []
        if stride != win or R.random() < 0.3:
            kw.append(f"stride={stride}")
        if pad or R.random() < 0.3:
            kw.append(f"pad={pad}")
        dy = f32(N, C, OH, OW)
        call = f"{op}(x, {win}" + "".join(", " + k for k in kw) + ")"
        add("pool", f"{op}_{n}", [f"output y = {call}", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
            lambda P, I, ref=ref, win=win, stride=stride, pad=pad: (
                {"y": ref(P["x"], win, stride, pad)}, sumdy(ref(P["x"], win, stride, pad), I["dy"])))
        n += 1
    for i in range(2):
        s = rshape(4, 1, 5)
        x = f32(*s)
        dy = f32(s[0], s[1])
        add("pool", f"global_avg_{i}", ["output y = global_avg_pool(x)", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
            lambda P, I: ({"y": P["x"].mean((2, 3))}, sumdy(P["x"].mean((2, 3)), I["dy"])))


def fam_gather():
    for i in range(5):
        V, D = int(R.integers(1, 7)), int(R.integers(1, 5))
        ish = rshape(int(R.integers(1, 4)), 1, 4)
        ids = i32(R.integers(0, V, size=ish))
        ids.reshape(-1)[: max(1, ids.size // 2)] = ids.reshape(-1)[0]  # repeats
        t = f32(V, D)
        dy = f32(*ish, D)
        add("gather", f"gather_{i}", ["output y = gather(table, ids)", "loss = sum(y * dy)"], {"table": t},
            {"ids": ids, "dy": dy},
            lambda P, I: ({"y": P["table"][I["ids"]]}, sumdy(P["table"][I["ids"]], I["dy"])))


def ce_ref(lg, lab):
    m = lax.stop_gradient(lg.max(-1, keepdims=True))
    lse = jnp.log(jnp.exp(lg - m).sum(-1)) + m[:, 0]
    return jnp.mean(lse - jnp.take_along_axis(lg, lab[:, None], 1)[:, 0])


def hinge_ref(s, lab):
    sy = jnp.take_along_axis(s, lab[:, None], 1)
    m = 1.0 + s - sy
    mask = np.arange(s.shape[1])[None, :] != np.asarray(lab)[:, None]
    return jnp.mean(jnp.sum(jnp.where(mask, relu(m), 0.0), -1))


def fam_losses():
    for i in range(4):
        Nn, Cc = int(R.integers(1, 7)), int(R.integers(1, 7))
        lg = f32(Nn, Cc, std=2.0)
        lab = i32(R.integers(0, Cc, size=Nn))
        add("losses", f"ce_{i}", ["output y = cross_entropy(logits, labels)", "loss = y"] if i % 2 else
            ["loss = cross_entropy(logits, labels)"], {"logits": lg}, {"labels": lab},
            lambda P, I, i=i: (({"y": ce_ref(P["logits"], I["labels"])} if i % 2 else {}),
                               ce_ref(P["logits"], I["labels"])))
    for i in range(3):
        s = rshape(int(R.integers(1, 4)), 1, 5)
        p, t = f32(*s), f32(*s)
        add("losses", f"mse_{i}", ["loss = mse(pred, target)"], {"pred": p, "target": t}, {},
            lambda P, I: ({}, jnp.mean((P["pred"] - P["target"]) ** 2)))
    for i in range(5):
        Nn, Cc = int(R.integers(1, 7)), int(R.integers(2, 7))
        lab = i32(R.integers(0, Cc, size=Nn))
        if i < 3:
            # dyadic scores; put some margins exactly at 0
            s = (R.integers(-4, 5, size=(Nn, Cc)) * 0.25).astype(np.float32)
            for nn in range(Nn):
                for j in range(Cc):
                    if j != lab[nn] and R.random() < 0.4:
                        s[nn, j] = s[nn, lab[nn]] - 1.0
        else:
            s = f32(Nn, Cc, std=0.7)
        add("losses", f"hinge_{i}", ["output y = hinge(scores, labels)", "loss = y"], {"scores": s}, {"labels": lab},
            lambda P, I: ({"y": hinge_ref(P["scores"], I["labels"])}, hinge_ref(P["scores"], I["labels"])))


def fam_attention():
    cfgs = []
    for i in range(10):
        lead = rshape(int(R.integers(0, 3)), 1, 3)
        causal = i % 3 == 0
        Tq = int(R.integers(1, 6))
        Tk = Tq if causal else int(R.integers(1, 6))
        if not causal and i % 3 == 1 and Tk == Tq:
            Tk = Tq + 1
        d, dv = int(R.integers(1, 10)), int(R.integers(1, 10))
        scale = None if i % 2 == 0 else float(np.round(R.uniform(0.1, 1.5), 3))
        q, k, v = f32(*lead, Tq, d), f32(*lead, Tk, d), f32(*lead, Tk, dv)
        dy = f32(*lead, Tq, dv)
        kws = ""
        if causal:
            kws += ", causal=true"
        elif i % 4 == 1:
            kws += ", causal=false"
        if scale is not None:
            kws += f", scale={scale}"
        add("attention", f"attn_{i}", [f"output y = attention(q, k, v{kws})", "loss = sum(y * dy)"],
            {"q": q, "k": k, "v": v}, {"dy": dy},
            lambda P, I, causal=causal, scale=scale: (
                {"y": attention_ref(P["q"], P["k"], P["v"], causal, scale)},
                sumdy(attention_ref(P["q"], P["k"], P["v"], causal, scale), I["dy"])))


def fam_rnn():
    for i in range(10):
        cell = ["lstm", "gru"][i % 2]
        G = 4 if cell == "lstm" else 3
        Nn, T, F = int(R.integers(1, 4)), (1 if i < 4 else int(R.integers(2, 7))), int(R.integers(1, 10))
        H = [3, 5, 7, 2, 6, 1, 9][i % 7]
        x = f32(Nn, T, F)
        wx, wh, b = f32(F, G * H, std=0.5), f32(H, G * H, std=0.5), f32(G * H, std=0.5)
        dy = f32(Nn, T, H)
        ref = lstm_ref if cell == "lstm" else gru_ref
        add("rnn", f"{cell}_seq_{i}", [f"output y = {cell}_seq(x, w_x, w_h, b)", "loss = sum(y * dy)"],
            {"x": x, "w_x": wx, "w_h": wh, "b": b}, {"dy": dy},
            lambda P, I, ref=ref: ({"y": ref(P["x"], P["w_x"], P["w_h"], P["b"])},
                                   sumdy(ref(P["x"], P["w_x"], P["w_h"], P["b"]), I["dy"])))


def layer_norm_ref(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * g + b


def self_attn_ref(x, P, pre, heads, causal):
    N, T, D = x.shape
    dh = D // heads
    def proj(w, b):
        return (x @ P[pre + w] + P[pre + b]).reshape(N, T, heads, dh).transpose(0, 2, 1, 3)
    q, k, v = proj("wq", "bq"), proj("wk", "bk"), proj("wv", "bv")
    a = attention_ref(q, k, v, causal)
    a = a.transpose(0, 2, 1, 3).reshape(N, T, D)
    return a @ P[pre + "wo"] + P[pre + "bo"]


def fam_layers():
    # dense
    for i in range(4):
        lead = rshape(int(R.integers(1, 3)), 1, 4)
        I_, U = int(R.integers(1, 10)), int(R.integers(1, 10))
        x = f32(*lead, I_)
        P = {"x": x, "d.weight": f32(I_, U), "d.bias": f32(U)}
        dy = f32(*lead, U)
        body = ["d = x |> dense(%d)" % U if i % 2 else "d = dense(x, %d)" % U, "output y = d", "loss = sum(y * dy)"]
        add("layers", f"dense_{i}", body, P, {"dy": dy},
            lambda P, I: ({"y": P["x"] @ P["d.weight"] + P["d.bias"]},
                          sumdy(P["x"] @ P["d.weight"] + P["d.bias"], I["dy"])))
    # two stacked dense with relu
    x = f32(3, 4)
    P = {"x": x, "h.weight": f32(4, 5), "h.bias": f32(5), "o.weight": f32(5, 2), "o.bias": f32(2)}
    dy = f32(3, 2)
    f = lambda P: relu(P["x"] @ P["h.weight"] + P["h.bias"]) @ P["o.weight"] + P["o.bias"]
    add("layers", "dense_stack", ["h = x |> dense(5) |> relu", "output o = h |> dense(2)", "loss = sum(o * dy)"], P,
        {"dy": dy}, lambda P, I, f=f: ({"o": f(P)}, sumdy(f(P), I["dy"])))
    # conv2d
    n = 0
    while n < 4:
        N, C, O = int(R.integers(1, 3)), int(R.integers(1, 4)), int(R.integers(1, 4))
        H, W = int(R.integers(3, 9)), int(R.integers(3, 9))
        K = int(R.integers(1, 4))
        stride, pad, dil = int(R.integers(1, 3)), int(R.integers(0, 2)), int(R.integers(1, 3))
        if n == 3:
            stride, pad = 1, "same"
        p = 0 if pad == "same" else pad
        if pad != "same" and ((H + 2 * p - dil * (K - 1) - 1) // stride + 1 < 1 or (W + 2 * p - dil * (K - 1) - 1) // stride + 1 < 1):
            continue
        x = f32(N, C, H, W)
        P = {"x": x, "c.weight": f32(O, C, K, K, std=0.5), "c.bias": f32(O)}
        f = lambda P, stride=stride, pad=pad, dil=dil: conv_ref(P["x"], P["c.weight"], stride, pad, dil) + P["c.bias"][:, None, None]
        ys = np.asarray(f(to64(P))).shape
        dy = f32(*ys)
        padstr = '"same"' if pad == "same" else str(pad)
        add("layers", f"conv2d_{n}", [f"c = x |> conv2d({O}, kernel={K}, stride={stride}, pad={padstr}, dilation={dil})",
                                      "output y = c", "loss = sum(y * dy)"], P, {"dy": dy},
            lambda P, I, f=f: ({"y": f(P)}, sumdy(f(P), I["dy"])))
        n += 1
    # layer_norm
    for i in range(4):
        lead = rshape(int(R.integers(1, 3)), 1, 4)
        D = int(R.integers(1, 8))
        x = f32(*lead, D, std=2.0) + 1.0
        P = {"x": x, "n.gamma": f32(D) + 1, "n.beta": f32(D)}
        eps = [None, 0.01, None, 0.5][i]
        dy = f32(*lead, D)
        call = "layer_norm(x)" if eps is None else f"x |> layer_norm(eps={eps})"
        e = 1e-5 if eps is None else eps
        if D == 1:
            toml = None
        add("layers", f"layer_norm_{i}", [f"n = {call}", "output y = n", "loss = sum(y * dy)"], P, {"dy": dy},
            lambda P, I, e=e: ({"y": layer_norm_ref(P["x"], P["n.gamma"], P["n.beta"], e)},
                               sumdy(layer_norm_ref(P["x"], P["n.gamma"], P["n.beta"], e), I["dy"])))
    # embedding
    for i in range(3):
        V, D = int(R.integers(1, 8)), int(R.integers(1, 5))
        ish = rshape(int(R.integers(1, 3)), 1, 5)
        ids = i32(R.integers(0, V, size=ish))
        P = {"e.weight": f32(V, D)}
        dy = f32(*ish, D)
        add("layers", f"embedding_{i}", [f"e = ids |> embedding({V}, {D})", "output y = e", "loss = sum(y * dy)"], P,
            {"ids": ids, "dy": dy},
            lambda P, I: ({"y": P["e.weight"][I["ids"]]}, sumdy(P["e.weight"][I["ids"]], I["dy"])))
    # self_attention
    for i in range(5):
        heads = [2, 3, 1, 2, 4][i]
        dh = int(R.integers(1, 4))
        D = heads * dh
        Nn, T = int(R.integers(1, 4)), int(R.integers(1, 6))
        causal = i % 2 == 0
        x = f32(Nn, T, D)
        P = {"x": x}
        for nm in ["wq", "wk", "wv", "wo"]:
            P["a." + nm] = f32(D, D, std=0.6)
        for nm in ["bq", "bk", "bv", "bo"]:
            P["a." + nm] = f32(D, std=0.3)
        dy = f32(Nn, T, D)
        args = []
        if heads != 1 or i == 2:
            args.append(f"heads={heads}")
        if causal or i == 1:
            args.append(f"causal={'true' if causal else 'false'}")
        add("layers", f"self_attention_{i}", [f"a = x |> self_attention({', '.join(args)})", "output y = a",
                                              "loss = sum(y * dy)"], P, {"dy": dy},
            lambda P, I, heads=heads, causal=causal: (
                {"y": self_attn_ref(P["x"], P, "a.", heads, causal)},
                sumdy(self_attn_ref(P["x"], P, "a.", heads, causal), I["dy"])))
    # lstm / gru std layers
    for i, cell in enumerate(["lstm", "gru", "lstm", "gru"]):
        G = 4 if cell == "lstm" else 3
        Nn, T, F, H = int(R.integers(1, 4)), [1, 1, 4, 5][i], int(R.integers(1, 5)), [3, 5, 2, 7][i]
        x = f32(Nn, T, F)
        P = {"x": x, "h.w_x": f32(F, G * H, std=0.5), "h.w_h": f32(H, G * H, std=0.5), "h.b": f32(G * H, std=0.5)}
        dy = f32(Nn, T, H)
        ref = lstm_ref if cell == "lstm" else gru_ref
        add("layers", f"{cell}_layer_{i}", [f"h = x |> {cell}({H})", "output y = h", "loss = sum(y * dy)"], P, {"dy": dy},
            lambda P, I, ref=ref: ({"y": ref(P["x"], P["h.w_x"], P["h.w_h"], P["h.b"])},
                                   sumdy(ref(P["x"], P["h.w_x"], P["h.w_h"], P["h.b"]), I["dy"])))



def fam_compose():
    """random expression DAGs over a common shape: fusion / fan-out / broadcasting stress"""
    for ci in range(30):
        r = int(R.integers(2, 4))
        S = rshape(r, 2, 9) if r == 2 else rshape(r, 2, 5)
        B = S[-1]
        P = {}
        pool = []  # (name, shape)
        for j in range(int(R.integers(2, 4))):
            nm = f"p{j}"
            P[nm] = f32(*S)
            pool.append((nm, tuple(S)))
        P["w"] = f32(B, B, std=0.6)
        P["v"] = f32(B)
        pool.append(("v", (B,)))
        env_fns = {}
        body = []
        fns = {}  # name -> callable(env) returning jax value

        def ref(nm):
            return lambda E, nm=nm: E[nm]
        for nm, _ in pool:
            fns[nm] = ref(nm)
        nstmt = int(R.integers(4, 10))
        for k in range(nstmt):
            a, sa = pool[-1] if (k > 0 and R.random() < 0.75) else pool[int(R.integers(0, len(pool)))]
            b, sb = pool[int(R.integers(0, len(pool)))]
            so = tuple(np.broadcast_shapes(sa, sb))
            kind = int(R.integers(0, 12))
            A, Bf = fns[a], fns[b]
            if kind == 0:
                op = R.choice(["+", "-", "*"])
                expr = f"{a} {op} {b}"
                f = {"+": lambda E, A=A, Bf=Bf: A(E) + Bf(E), "-": lambda E, A=A, Bf=Bf: A(E) - Bf(E),
                     "*": lambda E, A=A, Bf=Bf: A(E) * Bf(E)}[op]
                sh = so
            elif kind == 1:
                expr = f"{a} / ({b} * {b} + 1)"
                f = lambda E, A=A, Bf=Bf: A(E) / (Bf(E) * Bf(E) + 1)
                sh = so
            elif kind == 2:
                op = R.choice(["maximum", "minimum"])
                expr = f"{op}({a}, {b})"
                f = (lambda E, A=A, Bf=Bf: emax(A(E), Bf(E))) if op == "maximum" else (lambda E, A=A, Bf=Bf: emin(A(E), Bf(E)))
                sh = so
            elif kind == 3:
                u = R.choice(["relu", "sigmoid", "tanh", "abs", "neg"])
                uf = {"relu": relu, "sigmoid": sigmoid, "tanh": jnp.tanh, "abs": jabs, "neg": lambda x: -x}[u]
                expr = f"{a} |> {u}" if R.random() < 0.5 else f"{u}({a})"
                f = lambda E, A=A, uf=uf: uf(A(E))
                sh = sa
            elif kind == 4:
                expr = f"exp(tanh({a})) * 0.5 + sqrt({a} * {a} + 1) - log(sigmoid({a}) + 0.5)"
                f = lambda E, A=A: jnp.exp(jnp.tanh(A(E))) * 0.5 + jnp.sqrt(A(E) * A(E) + 1) - jnp.log(sigmoid(A(E)) + 0.5)
                sh = sa
            elif kind == 5 and len(sa) >= 1:
                op = R.choice(["sum", "mean", "max"])
                ax = int(R.integers(-len(sa), len(sa)))
                expr = f"{op}({a}, axis={ax}, keepdims=true)"
                if op == "max":
                    f = lambda E, A=A, ax=ax: rmax(A(E), ax, True)
                elif op == "sum":
                    f = lambda E, A=A, ax=ax: jnp.sum(A(E), axis=ax, keepdims=True)
                else:
                    f = lambda E, A=A, ax=ax: jnp.mean(A(E), axis=ax, keepdims=True)
                sh = list(sa)
                sh[ax] = 1
                sh = tuple(sh)
            elif kind == 6 and len(sa) >= 1:
                op = R.choice(["softmax", "log_softmax"])
                ax = int(R.integers(-len(sa), len(sa)))
                expr = f"{op}({a}, axis={ax})"
                rf = softmax if op == "softmax" else log_softmax
                f = lambda E, A=A, ax=ax, rf=rf: rf(A(E), ax)
                sh = sa
            elif kind == 7 and len(sa) >= 1 and sa[-1] == B:
                expr = f"{a} @ w"
                f = lambda E, A=A: jnp.matmul(A(E), E["w"], precision="highest")
                sh = sa
            elif kind == 8 and len(sa) >= 2 and sa[-1] == sa[-2]:
                expr = f"transpose({a})"
                f = lambda E, A=A: jnp.swapaxes(A(E), -1, -2)
                sh = sa
            elif kind == 9:
                c = float(np.round(R.uniform(-2, 2), 2))
                expr = f"{c} - {a} * {round(abs(c) + 0.5, 2)}"
                f = lambda E, A=A, c=c: c - A(E) * round(abs(c) + 0.5, 2)
                sh = sa
            elif kind == 10 and len(sa) == len(S) and sa == tuple(S):
                ax = int(R.integers(-len(sa), len(sa)))
                L = sa[ax]
                st = int(R.integers(-L, L))
                idx = [slice(None)] * len(sa)
                idx[ax] = slice(st, None)
                n1 = len(range(L)[st:])
                # slice then concat back to the original size along ax with a copy of the head
                expr = f"concat([slice({a}, {ax}, {st}, {L + 3}), slice({a}, {ax}, 0, {L - n1})], {ax})"
                idx2 = [slice(None)] * len(sa)
                idx2[ax] = slice(0, L - n1)
                f = lambda E, A=A, idx=tuple(idx), idx2=tuple(idx2), ax=ax: jnp.concatenate([A(E)[idx], A(E)[idx2]], ax)
                sh = sa
                if L - n1 == 0:
                    continue
            else:
                expr = f"{a} * {b} + {a}"
                f = lambda E, A=A, Bf=Bf: A(E) * Bf(E) + A(E)
                sh = so
            nm = f"t{k}"
            body.append(f"{nm} = {expr}")
            fns[nm] = f
            pool.append((nm, tuple(sh)))
        # output: last binding broadcast to at least something; loss uses two intermediates (fan-out)
        ylast, sy = pool[-1]
        other, so2 = pool[len(pool) // 2]
        dy = np.asarray(f32(*sy) if sy else np.float32(R.normal()).reshape(()), np.float32)
        body.append(f"output y = {ylast}")
        body.append(f"loss = sum(y * dy) + mean({other} * {other})")
        fy, fo = fns[ylast], fns[other]
        # drop unused params? keep them all: unused params get zero grads
        add("compose", f"dag_{ci}", body, P, {"dy": dy},
            lambda P, I, fy=fy, fo=fo: ({"y": fy(P)}, jnp.sum(fy(P) * I["dy"]) + jnp.mean(fo(P) * fo(P))))


def fam_pipeline():
    # lenet-like
    for i in range(3):
        N, C, H = int(R.integers(1, 4)), int(R.integers(1, 3)), int(R.integers(6, 10))
        O1, K = int(R.integers(1, 4)), int(R.integers(2, 4))
        P = {"x": f32(N, C, H, H)}
        P["c1.weight"] = f32(O1, C, K, K, std=0.5)
        P["c1.bias"] = f32(O1, std=0.3)
        H1 = H - K + 1 + 2 * 1
        Hp = (H1 - 2) // 2 + 1
        F = O1 * Hp * Hp
        ncls = int(R.integers(2, 6))
        P["f.weight"] = f32(F, ncls, std=0.5)
        P["f.bias"] = f32(ncls)
        lab = i32(R.integers(0, ncls, size=N))
        def f(P, I):
            c = relu(conv_ref(P["x"], P["c1.weight"], 1, 1, 1) + P["c1.bias"][:, None, None])
            c = max_pool_ref(c, 2, 2, 0)
            lg = c.reshape(c.shape[0], -1) @ P["f.weight"] + P["f.bias"]
            return {"probs": softmax(lg, -1)}, ce_ref(lg, I["labels"])
        add("pipeline", f"lenet_{i}", [f"c1 = x |> conv2d({O1}, kernel={K}, pad=1) |> relu |> max_pool2d(2)",
                                       f"f = c1 |> flatten |> dense({ncls})", "output probs = softmax(f)",
                                       "loss = cross_entropy(f, labels)"], P, {"labels": lab}, f)
    # transformer-ish block
    for i in range(3):
        N, T, heads, dh, V = int(R.integers(1, 3)), int(R.integers(1, 6)), [2, 3, 1][i], int(R.integers(1, 3)), int(R.integers(2, 8))
        D = heads * dh
        ids = i32(R.integers(0, V, size=(N, T)))
        P = {"e.weight": f32(V, D)}
        for nm in ["wq", "wk", "wv", "wo"]:
            P["a." + nm] = f32(D, D, std=0.6)
        for nm in ["bq", "bk", "bv", "bo"]:
            P["a." + nm] = f32(D, std=0.3)
        P["n.gamma"] = f32(D) + 1
        P["n.beta"] = f32(D)
        P["o.weight"] = f32(D, V)
        P["o.bias"] = f32(V)
        lab = i32(R.integers(0, V, size=N))
        causal = i != 1
        def f(P, I, heads=heads, causal=causal):
            e = P["e.weight"][I["ids"]]
            a = self_attn_ref(e, P, "a.", heads, causal)
            h = layer_norm_ref(e + a, P["n.gamma"], P["n.beta"])
            lg = h[:, -1] @ P["o.weight"] + P["o.bias"]
            return {"lg": lg}, ce_ref(lg, I["labels"])
        add("pipeline", f"transformer_{i}", [f"e = ids |> embedding({V}, {D})",
                                             f"a = e |> self_attention(heads={heads}, causal={'true' if causal else 'false'})",
                                             "s = e + a", "n = layer_norm(s)", f"output lg = n |> last |> dense({V})" if False else "l = last(n)",
                                             f"o = l |> dense({V})", "output lg = o", "loss = cross_entropy(o, labels)"],
            P, {"ids": ids, "labels": lab}, f)
    # rnn -> last -> dense -> mse
    for i, cell in enumerate(["lstm", "gru", "lstm", "gru"]):
        G = 4 if cell == "lstm" else 3
        N, T, F, H = int(R.integers(1, 4)), int(R.integers(1, 7)), int(R.integers(1, 5)), int(R.integers(1, 8))
        P = {"x": f32(N, T, F), "h.w_x": f32(F, G * H, std=0.5), "h.w_h": f32(H, G * H, std=0.5), "h.b": f32(G * H, std=0.5),
             "d.weight": f32(H, 2), "d.bias": f32(2)}
        tgt = f32(N, 2)
        rf = lstm_ref if cell == "lstm" else gru_ref
        def f(P, I, rf=rf):
            h = rf(P["x"], P["h.w_x"], P["h.w_h"], P["h.b"])
            y = h[:, -1] @ P["d.weight"] + P["d.bias"]
            return {"y": y}, jnp.mean((y - I["target"]) ** 2)
        add("pipeline", f"{cell}_head_{i}", [f"h = x |> {cell}({H})", "d = h |> last |> dense(2)", "output y = d",
                                             "loss = mse(d, target)"], P, {"target": tgt}, f)



def fam_edge():
    E = "edge"
    # maximum(x, 0) at x == 0 is a tie: grad 0.5 (unlike relu'(0) = 0)
    x = f32(3, 4); x.reshape(-1)[::2] = 0.0
    dy = f32(3, 4)
    add(E, "maximum_zero_tie", ["output y = maximum(x, 0)", "output r = relu(x)", "loss = sum(y * dy) + sum(r * dy)"],
        {"x": x}, {"dy": dy},
        lambda P, I: ({"y": emax(P["x"], 0.0), "r": relu(P["x"])}, sumdy(emax(P["x"], 0.0), I["dy"]) + sumdy(relu(P["x"]), I["dy"])))
    # same operand twice
    x = f32(2, 3)
    dy = f32(2, 3)
    add(E, "minimum_self", ["output y = minimum(x, x) + maximum(x, x) * x - x", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
        lambda P, I: ({"y": emin(P["x"], P["x"]) + emax(P["x"], P["x"]) * P["x"] - P["x"]},
                      sumdy(emin(P["x"], P["x"]) + emax(P["x"], P["x"]) * P["x"] - P["x"], I["dy"])))
    # full tie in max over everything
    x = np.full((2, 3, 2), 0.75, np.float32)
    add(E, "max_all_tie", ["output y = max(x)", "loss = y * 3"], {"x": x}, {},
        lambda P, I: ({"y": rmax(P["x"], None, False)}, rmax(P["x"], None, False) * 3))
    x = np.array([[1, 2, 2], [3, 3, 3], [-1, 0, -1]], np.float32)
    dy = f32(1, 3)
    add(E, "max_axis0_keep_tie", ["output y = max(x, axis=[-2], keepdims=true)", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
        lambda P, I: ({"y": rmax(P["x"], [-2], True)}, sumdy(rmax(P["x"], [-2], True), I["dy"])))
    # max pool: all values equal and padded: first REAL cell wins
    for win, st, pad in [(2, 2, 1), (3, 1, 2), (3, 2, 1), (2, 1, 1)]:
        x = np.full((1, 2, 4, 5), -1.5, np.float32)
        x[0, 1, 1:3, 2:4] = 0.0
        OH = (4 + 2 * pad - win) // st + 1; OW = (5 + 2 * pad - win) // st + 1
        dy = f32(1, 2, OH, OW)
        add(E, f"maxpool_flat_{win}{st}{pad}", [f"output y = max_pool2d(x, {win}, stride={st}, pad={pad})", "loss = sum(y * dy)"],
            {"x": x}, {"dy": dy},
            lambda P, I, win=win, st=st, pad=pad: ({"y": max_pool_ref(P["x"], win, st, pad)}, sumdy(max_pool_ref(P["x"], win, st, pad), I["dy"])))
    # tiny images with large padding (avg over real cells only)
    for (Hh, Ww, win, st, pad) in [(1, 1, 2, 1, 1), (1, 3, 3, 1, 2), (2, 1, 3, 2, 2)]:
        x = f32(1, 2, Hh, Ww)
        OH = (Hh + 2 * pad - win) // st + 1; OW = (Ww + 2 * pad - win) // st + 1
        dy = f32(1, 2, OH, OW)
        for op, rf in [("avg_pool2d", avg_pool_ref), ("max_pool2d", max_pool_ref)]:
            add(E, f"{op}_tiny_{Hh}{Ww}{win}{st}{pad}", [f"output y = {op}(x, {win}, stride={st}, pad={pad})", "loss = sum(y * dy)"],
                {"x": x}, {"dy": dy},
                lambda P, I, win=win, st=st, pad=pad, rf=rf: ({"y": rf(P["x"], win, st, pad)}, sumdy(rf(P["x"], win, st, pad), I["dy"])))
    # conv same with 1x1, even kernels, non-square, dilation 3
    for (kh, kw, dil) in [(1, 1, 1), (2, 2, 1), (2, 3, 2), (4, 1, 1), (3, 2, 3), (2, 4, 2)]:
        x = f32(1, 2, 5, 6); w = f32(2, 2, kh, kw, std=0.5)
        dy = f32(1, 2, 5, 6)
        dstr = f", dilation={dil}" if dil != 1 else ""
        add(E, f"conv_same_{kh}{kw}{dil}", [f'output y = conv(x, w, stride=1, pad="same"{dstr})', "loss = sum(y * dy)"],
            {"x": x, "w": w}, {"dy": dy},
            lambda P, I, dil=dil: ({"y": conv_ref(P["x"], P["w"], 1, "same", dil)}, sumdy(conv_ref(P["x"], P["w"], 1, "same", dil), I["dy"])))
    # softmax over a size-1 axis, large magnitudes, very negative
    x = f32(3, 1, 4) * 50
    dy = f32(3, 1, 4)
    add(E, "softmax_axis_size1", ["output y = softmax(x, axis=1)", "output z = log_softmax(x, axis=-1)",
                                  "loss = sum(y * dy) + sum(z * dy)"], {"x": x}, {"dy": dy},
        lambda P, I: ({"y": softmax(P["x"], 1), "z": log_softmax(P["x"], -1)},
                      sumdy(softmax(P["x"], 1), I["dy"]) + sumdy(log_softmax(P["x"], -1), I["dy"])))
    lg = np.array([[100., -100., 0.], [-300., -301., -302.], [1e4, 1e4, -1e4]], np.float32)
    add(E, "ce_large_logits", ["output y = cross_entropy(logits, labels)", "loss = y"], {"logits": lg},
        {"labels": i32([1, 2, 0])}, lambda P, I: ({"y": ce_ref(P["logits"], I["labels"])}, ce_ref(P["logits"], I["labels"])))
    # attention corner cases
    for (lead, T, d, causal) in [((), 1, 3, True), ((2,), 1, 1, False), ((1, 2), 4, 2, True)]:
        q, k, v = f32(*lead, T, d), f32(*lead, T, d), f32(*lead, T, d)
        dy = f32(*lead, T, d)
        add(E, f"attn_T{T}_d{d}_{len(lead)}", [f"output y = attention(q, k, v, causal={'true' if causal else 'false'})", "loss = sum(y * dy)"],
            {"q": q, "k": k, "v": v}, {"dy": dy},
            lambda P, I, causal=causal: ({"y": attention_ref(P["q"], P["k"], P["v"], causal)}, sumdy(attention_ref(P["q"], P["k"], P["v"], causal), I["dy"])))
    # scalar param broadcasting and scalar mse
    s_ = np.float32(0.7).reshape(()); x = f32(2, 3); dy = f32(2, 3)
    add(E, "scalar_param", ["output y = x * s + s / (x * x + 1) - s", "loss = sum(y * dy) + mse(s, 0.25)"], {"x": x, "s": np.array(s_)}, {"dy": dy},
        lambda P, I: ({"y": P["x"] * P["s"] + P["s"] / (P["x"] ** 2 + 1) - P["s"]},
                      sumdy(P["x"] * P["s"] + P["s"] / (P["x"] ** 2 + 1) - P["s"], I["dy"]) + (P["s"] - 0.25) ** 2))
    # i32 through shape ops, then gather
    ids = i32(R.integers(0, 5, size=(2, 3)))
    t = f32(5, 2)
    def f(P, I):
        ii = I["ids"]
        j = jnp.concatenate([ii, ii[:, 1:]], axis=-1)    # [2,5]
        j = jnp.transpose(j).reshape(5, 2)[-4:]          # slice
        return {"y": P["table"][j]}, jnp.sum(P["table"][j] ** 2)
    add(E, "i32_shape_ops", ["j0 = concat([ids, slice(ids, 1, 1, 99)], -1)", "j1 = reshape(transpose(j0), [5, -1])",
                             "j = slice(j1, 0, -4, 10)", "output y = gather(table, j)", "loss = sum(y * y)"], {"table": t}, {"ids": ids}, f)
    # gather with scalar ids and concat of one operand, slice full range
    t = f32(4, 3); dy = f32(3)
    add(E, "gather_scalar_id", ["output y = gather(table, id)", "loss = sum(y * dy)"], {"table": t}, {"id": np.array(2, np.int32), "dy": dy},
        lambda P, I: ({"y": P["table"][2]}, sumdy(P["table"][2], I["dy"])))
    x = f32(2, 3); dy = f32(2, 3)
    add(E, "concat_one_slice_full", ["output y = concat([slice(x, -1, -10, 10)], -2)", "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
        lambda P, I: ({"y": P["x"]}, sumdy(P["x"], I["dy"])))
    # hinge: all margins exactly zero, and all-positive
    s = np.array([[0.5, -0.5, -0.5], [1.0, 2.0, 1.0]], np.float32)
    add(E, "hinge_all_kink", ["loss = hinge(scores, labels)"], {"scores": s}, {"labels": i32([0, 1])},
        lambda P, I: ({}, hinge_ref(P["scores"], I["labels"])))
    # layer_norm with D = 1 and constant rows
    x = np.array([[[1.], [2.]], [[3.], [-4.]]], np.float32)
    P = {"x": x, "n.gamma": np.array([1.5], np.float32), "n.beta": np.array([0.25], np.float32)}
    dy = f32(2, 2, 1)
    add(E, "layer_norm_d1", ["n = layer_norm(x)", "output y = n", "loss = sum(y * dy)"], P, {"dy": dy},
        lambda P, I: ({"y": layer_norm_ref(P["x"], P["n.gamma"], P["n.beta"])}, sumdy(layer_norm_ref(P["x"], P["n.gamma"], P["n.beta"]), I["dy"])))
    x = np.tile(np.array([[0.3, 0.3, 0.3, 0.3]], np.float32), (3, 1))
    x[1] = [1., 2., 3., 4.]
    P = {"x": x, "n.gamma": f32(4) + 1, "n.beta": f32(4)}
    dy = f32(3, 4)
    add(E, "layer_norm_const_row", ["n = x |> layer_norm(eps=0.001)", "output y = n", "loss = sum(y * dy)"], P, {"dy": dy},
        lambda P, I: ({"y": layer_norm_ref(P["x"], P["n.gamma"], P["n.beta"], 1e-3)}, sumdy(layer_norm_ref(P["x"], P["n.gamma"], P["n.beta"], 1e-3), I["dy"])))
    # self-attention with heads == D (dh = 1), T = 1
    for (heads, T) in [(3, 4), (2, 1)]:
        D = 3 if heads == 3 else 4
        x = f32(2, T, D)
        P = {"x": x}
        for nm in ["wq", "wk", "wv", "wo"]:
            P["a." + nm] = f32(D, D, std=0.6)
        for nm in ["bq", "bk", "bv", "bo"]:
            P["a." + nm] = f32(D, std=0.3)
        dy = f32(2, T, D)
        add(E, f"self_attn_h{heads}_T{T}", [f"a = self_attention(x, heads={heads}, causal=true)", "output y = a", "loss = sum(y * dy)"],
            P, {"dy": dy}, lambda P, I, heads=heads: ({"y": self_attn_ref(P["x"], P, "a.", heads, True)},
                                                     sumdy(self_attn_ref(P["x"], P, "a.", heads, True), I["dy"])))
    # symbolic dims bound from inputs, std layers on inputs
    x = f32(3, 4, 5); dy = f32(3, 4, 2)
    P = {"d.weight": f32(5, 2), "d.bias": f32(2)}
    add_raw(E, "symbolic_dims", "model m_sym {\n    input x: f32[N, T, F]\n    input dy: f32[N, T, 2]\n    d = x |> dense(2) |> tanh\n"
            "    output y = d\n    loss = sum(y * dy)\n}\n", P, {"x": x, "dy": dy},
            lambda P, I: ({"y": jnp.tanh(I["x"] @ P["d.weight"] + P["d.bias"])}, sumdy(jnp.tanh(I["x"] @ P["d.weight"] + P["d.bias"]), I["dy"])))
    # user fn with params: naming b.a.weight
    x = f32(2, 3); dy = f32(2, 4)
    P = {"b.a.weight": f32(3, 4), "b.a.bias": f32(4), "b.s": f32(4)}
    add_raw(E, "fn_param_naming", "fn block(x, units: int) {\n    a = dense(x, units)\n    param s: f32[units] = ones\n    return a * s\n}\n"
            "model m_fn {\n    input x: f32[2, 3]\n    input dy: f32[2, 4]\n    b = block(x, 4)\n    output y = b\n    loss = sum(y * dy)\n}\n",
            P, {"x": x, "dy": dy},
            lambda P, I: ({"y": (I["x"] @ P["b.a.weight"] + P["b.a.bias"]) * P["b.s"]},
                          sumdy((I["x"] @ P["b.a.weight"] + P["b.a.bias"]) * P["b.s"], I["dy"])))

    # empty slices inside a concat (NumPy: start >= end after clamping gives an empty axis)
    x = f32(3, 4); dy = f32(3, 5)
    add(E, "concat_empty_slice", ["output y = concat([slice(x, 1, 3, 1), x, slice(x, -1, -1, 99), slice(x, 1, 9, 12)], 1)",
                                  "loss = sum(y * dy)"], {"x": x}, {"dy": dy},
        lambda P, I: ({"y": jnp.concatenate([P["x"][:, 3:1], P["x"], P["x"][:, -1:]], 1)},
                      sumdy(jnp.concatenate([P["x"][:, 3:1], P["x"], P["x"][:, -1:]], 1), I["dy"])))

FAMS_EXTRA = dict(compose=fam_compose, pipeline=fam_pipeline, edge=fam_edge)

FAMS = dict(unary=fam_unary, minmax=fam_minmax, softmax=fam_softmax, reduce=fam_reduce, matmul=fam_matmul,
            shape=fam_shape, conv=fam_conv, pool=fam_pool, gather=fam_gather, losses=fam_losses,
            attention=fam_attention, rnn=fam_rnn, layers=fam_layers, **FAMS_EXTRA)

if __name__ == "__main__":
    only = args.only.split(",") if args.only else list(FAMS)
    for k in FAMS:  # always call all so the RNG stream is identical
        before = len(CASES)
        FAMS[k]()
        if k not in only:
            del CASES[before:]
    if os.path.exists(args.out) and not args.only:
        shutil.rmtree(args.out)
    counts = {}
    import time
    for c in CASES:
        t0 = time.time()
        write(c, args.out)
        if time.time() - t0 > 2: print("slow", c.family, c.name, time.time() - t0, flush=True)
        counts[c.family] = counts.get(c.family, 0) + 1
    print(counts, "total", len(CASES))
