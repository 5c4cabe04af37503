"""NumPy float64 references written from PyTorch's documented layer equations (torch.nn docs),
on PyTorch's layouts (channels-first, weights ``(out, in)``), for tests/test_torch_weights.py."""
import math

import numpy as np

ERF = np.vectorize(math.erf)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def linear(x, w, b=None):
    """nn.Linear: ``y = x Wᵀ + b``."""
    return x @ w.T + (0 if b is None else b)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """nn.Conv2d: ``out[n, o, i, j] = b[o] + Σ_{c, p, q} W[o, c, p, q] ·
    xpad[n, g(o)·C/G + c, i·s + p·d, j·s + q·d]``."""
    n, cin, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - dh * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dw * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, cout, oh, ow))
    per = cout // groups
    for o in range(cout):
        g = o // per
        for p in range(kh):
            for q in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, p * dh:p * dh + stride * oh:stride,
                           q * dw:q * dw + stride * ow:stride]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, p, q])
    return out + (0 if b is None else b[None, :, None, None])


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1):
    """nn.ConvTranspose2d (the adjoint of conv2d): every input cell scatters
    ``x[n, c, i, j] · W[c, o, p, q]`` to
    ``out[n, g(c)·O/G + o, i·s + p − pad, j·s + q − pad]``;
    size ``(H − 1)·s − 2·pad + K + output_padding``."""
    n, cin, h, wd = x.shape
    _, og, kh, kw = w.shape
    full = np.zeros((n, og * groups, (h - 1) * stride + kh + output_padding,
                     (wd - 1) * stride + kw + output_padding))
    cg = cin // groups
    for c in range(cin):
        g = c // cg
        for i in range(h):
            for j in range(wd):
                rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
                full[:, g * og:(g + 1) * og, rows, cols] += x[:, c, i, j][:, None, None, None] * w[c]
    oh = (h - 1) * stride - 2 * padding + kh + output_padding
    ow = (wd - 1) * stride - 2 * padding + kw + output_padding
    out = full[:, :, padding:padding + oh, padding:padding + ow]
    return out + (0 if b is None else b[None, :, None, None])


def max_pool2d(x, k):
    n, c, h, w = x.shape
    return x[:, :, :h // k * k, :w // k * k].reshape(n, c, h // k, k, w // k, k).max(axis=(3, 5))


def batch_norm_eval(x, w, b, mean, var, eps=1e-5):
    """nn.BatchNorm (eval): ``(x − running_mean)/√(running_var + ε)·γ + β`` over axis 1."""
    sh = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) * w.reshape(sh) + b.reshape(sh)


def layer_norm(x, w, b, eps=1e-5):
    """nn.LayerNorm: ``(x − E[x])/√(Var[x] + ε)·γ + β`` over the last axis (biased Var)."""
    m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def lstm(x, w_ih, w_hh, b_ih, b_hh, reverse=False):
    """nn.LSTM (batch_first): ``i, f, g, o`` from ``W_i· x + b_i· + W_h· h + b_h·``;
    ``c' = f c + i g``, ``h' = o tanh(c')``."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    h, c, out = np.zeros((B, H)), np.zeros((B, H)), np.zeros((B, T, H))
    for t in (reversed(range(T)) if reverse else range(T)):
        z = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = np.split(z, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out[:, t] = h
    return out


def gru(x, w_ih, w_hh, b_ih, b_hh, reverse=False):
    """nn.GRU: ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z`` likewise,
    ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, ``h' = (1 − z) n + z h``."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    h, out = np.zeros((B, H)), np.zeros((B, T, H))
    for t in (reversed(range(T)) if reverse else range(T)):
        gi, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        (ir, iz, in_), (hr, hz, hn) = np.split(gi, 3, axis=1), np.split(gh, 3, axis=1)
        r, z = sigmoid(ir + hr), sigmoid(iz + hz)
        n = np.tanh(in_ + r * hn)
        h = (1 - z) * n + z * h
        out[:, t] = h
    return out


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mha(x, sd, heads, p=""):
    """nn.MultiheadAttention (batch_first, self-attention): ``[q k v] = x W_inᵀ + b_in``, heads
    split from the feature axis, ``softmax(q kᵀ/√d) v``, concatenated, ``out_proj``."""
    B, T, E = x.shape
    d = E // heads
    qkv = linear(x, sd[p + "in_proj_weight"], sd[p + "in_proj_bias"])
    q, k, v = (a.reshape(B, T, heads, d).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    a = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)) @ v
    return linear(a.transpose(0, 2, 1, 3).reshape(B, T, E), sd[p + "out_proj.weight"],
                  sd[p + "out_proj.bias"])


def gelu(z):
    return z * 0.5 * (1 + ERF(z / math.sqrt(2)))


def encoder_layer(x, sd, heads, norm_first):
    """nn.TransformerEncoderLayer (batch_first, activation="gelu", dropout 0):
    ``norm_first``: ``x + SA(LN1(x))`` then ``+ FF(LN2(·))``; else ``LN1(x + SA(x))``,
    ``LN2(· + FF(·))``; ``FF = linear2(gelu(linear1(·)))``."""
    ln = lambda h, n: layer_norm(h, sd[f"{n}.weight"], sd[f"{n}.bias"])
    ff = lambda h: linear(gelu(linear(h, sd["linear1.weight"], sd["linear1.bias"])),
                          sd["linear2.weight"], sd["linear2.bias"])
    sa = lambda h: mha(h, sd, heads, "self_attn.")
    if norm_first:
        h = x + sa(ln(x, "norm1"))
        return h + ff(ln(h, "norm2"))
    h = ln(x + sa(x), "norm1")
    return ln(h + ff(h), "norm2")


def mha_cross(x, ctx, sd, heads):
    """nn.MultiheadAttention with ``kdim = vdim ≠ E``: separate ``q/k/v_proj_weight``, packed
    ``in_proj_bias``; query from ``x``, key and value from ``ctx``."""
    (B, T, E), S = x.shape, ctx.shape[1]
    d = E // heads
    bq, bk, bv = np.split(sd["in_proj_bias"], 3)
    split = lambda a, n: a.reshape(B, n, heads, d).transpose(0, 2, 1, 3)
    q = split(linear(x, sd["q_proj_weight"], bq), T)
    k, v = (split(linear(ctx, sd[f"{n}_proj_weight"], b), S) for n, b in (("k", bk), ("v", bv)))
    a = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)) @ v
    return linear(a.transpose(0, 2, 1, 3).reshape(B, T, E), sd["out_proj.weight"],
                  sd["out_proj.bias"])


def group_norm(x, groups, w, b, eps=1e-5):
    """nn.GroupNorm: channels (axis 1) split into ``groups`` consecutive blocks, each
    standardized per example over its channels and every spatial cell; ``γ, β`` per channel."""
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    sh = (1, c) + (1,) * (x.ndim - 2)
    return g.reshape(x.shape) * w.reshape(sh) + b.reshape(sh)


def rms_norm(x, w, eps):
    """nn.RMSNorm: ``x / √(mean(x²) + ε) · γ`` over the last axis."""
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rnn(x, w_ih, w_hh, b_ih, b_hh):
    """nn.RNN (tanh): ``h' = tanh(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh)``."""
    B, T, _ = x.shape
    h, out = np.zeros((B, w_hh.shape[1])), np.zeros((B, T, w_hh.shape[1]))
    for t in range(T):
        h = np.tanh(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        out[:, t] = h
    return out
