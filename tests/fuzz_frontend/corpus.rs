//! Test corpus for `fuzz_frontend`: every workload in bench/workloads and
//! every golden model.dl, copied verbatim (CI has only this repository).

pub const CORPUS: &[(&str, &str)] = &[
    (
        "bench/workloads/gemm.dl",
        r##"# A bare matrix product, to compare kernels against the machine's peak.
model gemm {
    input a: f32[M, K]
    input b: f32[K, P]
    output c = a @ b
}
"##,
    ),
    (
        "bench/workloads/gru.dl",
        r##"# Sequence classifier: GRU over 32 steps, classify from the last state.
model gru_clf {
    input x: f32[N, T, 64]
    input label: i32[N]

    h = x |> gru(128)
    logits = h |> last |> dense(10)

    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "bench/workloads/lenet.dl",
        r##"# LeNet-5 style CNN on 28x28 grey images.
model lenet {
    input x: f32[N, 1, 28, 28]
    input label: i32[N]

    c1 = x |> conv2d(6, kernel=5, pad=2) |> relu |> max_pool2d(2)
    c2 = c1 |> conv2d(16, kernel=5) |> relu |> max_pool2d(2)
    f1 = c2 |> flatten |> dense(120) |> relu
    f2 = f1 |> dense(84) |> relu
    logits = f2 |> dense(10)

    output probs = softmax(logits)
    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "bench/workloads/lstm.dl",
        r##"# Sequence classifier: LSTM over 32 steps, classify from the last state.
model lstm_clf {
    input x: f32[N, T, 64]
    input label: i32[N]

    h = x |> lstm(128)
    logits = h |> last |> dense(10)

    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "bench/workloads/mlp.dl",
        r##"# Multi-layer perceptron on flattened 28x28 images.
model mlp {
    input x: f32[N, 784]
    input label: i32[N]

    h = x |> dense(256) |> relu
    logits = h |> dense(10)

    output probs = softmax(logits)
    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "bench/workloads/transformer.dl",
        r##"# One pre-norm transformer block language model over 64 tokens.
fn block(x, heads) {
    n1 = layer_norm(x)
    a = n1 |> self_attention(heads=heads, causal=true)
    r1 = x + a
    n2 = layer_norm(r1)
    up = n2 |> dense(256) |> relu
    down = up |> dense(64)
    return r1 + down
}

model tiny_lm {
    input tokens: i32[N, T]
    input target: i32[N, T]

    e = tokens |> embedding(1000, 64)
    b1 = block(e, 4)
    n = layer_norm(b1)
    logits = n |> dense(1000)

    loss = cross_entropy(reshape(logits, [-1, 1000]), reshape(target, [-1]))
}
"##,
    ),
    (
        "bench/workloads/vgg.dl",
        r##"# A small VGG-style CNN on 32x32 colour images (conv-bound).
model vgg {
    input x: f32[N, 3, 32, 32]
    input label: i32[N]

    a1 = x |> conv2d(32, kernel=3, pad=1) |> relu
    a2 = a1 |> conv2d(32, kernel=3, pad=1) |> relu |> max_pool2d(2)
    b1 = a2 |> conv2d(64, kernel=3, pad=1) |> relu
    b2 = b1 |> conv2d(64, kernel=3, pad=1) |> relu |> max_pool2d(2)
    logits = b2 |> flatten |> dense(10)

    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "golden/attention/batched_causal/model.dl",
        r##"model attn_batched_causal {
    param q: f32[2, 2, 3, 4] = normal(1.0)
    param k: f32[2, 2, 3, 4] = normal(1.0)
    param v: f32[2, 2, 3, 4] = normal(1.0)
    input dy: f32[2, 2, 3, 4]
    output y = attention(q, k, v, causal=true)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/attention/batched_cross/model.dl",
        r##"model attn_batched_cross {
    param q: f32[2, 3, 2, 4] = normal(1.0)
    param k: f32[2, 3, 5, 4] = normal(1.0)
    param v: f32[2, 3, 5, 2] = normal(1.0)
    input dy: f32[2, 3, 2, 2]
    output y = attention(q, k, v)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/attention/causal/model.dl",
        r##"model attn_causal {
    param q: f32[2, 4, 4] = normal(1.0)
    param k: f32[2, 4, 4] = normal(1.0)
    param v: f32[2, 4, 4] = normal(1.0)
    input dy: f32[2, 4, 4]
    output y = attention(q, k, v, causal=true)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/attention/cross_tq3_tk5/model.dl",
        r##"model attn_cross_tq3_tk5 {
    param q: f32[2, 3, 4] = normal(1.0)
    param k: f32[2, 5, 4] = normal(1.0)
    param v: f32[2, 5, 6] = normal(1.0)
    input dy: f32[2, 3, 6]
    output y = attention(q, k, v)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/attention/scale/model.dl",
        r##"model attn_scale {
    param q: f32[2, 3, 4] = normal(1.0)
    param k: f32[2, 5, 4] = normal(1.0)
    param v: f32[2, 5, 3] = normal(1.0)
    input dy: f32[2, 3, 3]
    output y = attention(q, k, v, scale=0.25)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/basic/model.dl",
        r##"model conv_basic {
    input x: f32[2, 3, 6, 5]
    param w: f32[4, 3, 3, 3] = normal(0.3)
    output y = conv(x, w)
}
"##,
    ),
    (
        "golden/conv/dilation2/model.dl",
        r##"model conv_dilation2 {
    param x: f32[1, 2, 7, 7] = normal(1.0)
    param w: f32[3, 2, 3, 3] = normal(0.3)
    input dy: f32[1, 3, 3, 3]
    output y = conv(x, w, dilation=2)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/dilation2_pad2/model.dl",
        r##"model conv_dilation2_pad2 {
    param x: f32[2, 2, 6, 5] = normal(1.0)
    param w: f32[2, 2, 3, 3] = normal(0.3)
    input dy: f32[2, 2, 6, 5]
    output y = conv(x, w, pad=2, dilation=2)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/k1x1/model.dl",
        r##"model conv_k1x1 {
    param x: f32[2, 4, 3, 5] = normal(1.0)
    param w: f32[5, 4, 1, 1] = normal(0.3)
    input dy: f32[2, 5, 3, 5]
    output y = conv(x, w)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/k1x1_stride2/model.dl",
        r##"model conv_k1x1_stride2 {
    param x: f32[1, 3, 5, 5] = normal(1.0)
    param w: f32[2, 3, 1, 1] = normal(0.3)
    input dy: f32[1, 2, 3, 3]
    output y = conv(x, w, stride=2)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/nonsquare/model.dl",
        r##"model conv_nonsquare {
    param x: f32[2, 2, 7, 4] = normal(1.0)
    param w: f32[3, 2, 3, 2] = normal(0.3)
    input dy: f32[2, 3, 7, 5]
    output y = conv(x, w, pad=1)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/same3/model.dl",
        r##"model conv_same3 {
    param x: f32[2, 3, 5, 4] = normal(1.0)
    param w: f32[2, 3, 3, 3] = normal(0.3)
    input dy: f32[2, 2, 5, 4]
    output y = conv(x, w, pad="same")
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/same5/model.dl",
        r##"model conv_same5 {
    param x: f32[1, 2, 6, 6] = normal(1.0)
    param w: f32[3, 2, 5, 5] = normal(0.3)
    input dy: f32[1, 3, 6, 6]
    output y = conv(x, w, pad="same")
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/conv/stride2_pad1/model.dl",
        r##"model conv_stride2_pad1 {
    param x: f32[2, 3, 7, 6] = normal(1.0)
    param w: f32[4, 3, 3, 3] = normal(0.3)
    input dy: f32[2, 4, 4, 3]
    output y = conv(x, w, stride=2, pad=1)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/elementwise/arith_broadcast/model.dl",
        r##"model arith {
    input a: f32[2, 3, 4]
    input b: f32[3, 1]
    input c: f32[4]
    output add = a + b
    output sub = a - c
    output mul = b * c
    output div = a / (b * b + 1)
    output lit = 2 * a - 0.5 / c + 3.
    output prec = a + b * c - -a / 2.0
    output piped = a - b |> relu
    output sci = 1e-1 * a * 25e-2
}
"##,
    ),
    (
        "golden/elementwise/arith_grad/model.dl",
        r##"# gradients of broadcast operands reduce over the broadcast axes
model arith_grad {
    input x: f32[2, 3, 4]
    input dy: f32[2, 3, 4]
    param s: f32[3, 1] = normal(1.0)
    param b: f32[4] = normal(1.0)
    param k: f32[] = normal(1.0)
    output y = (x * s + b) / (x * x + 2) - k * x
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/elementwise/unary/model.dl",
        r##"model unary {
    input x: f32[2, 3, 4]
    input p: f32[2, 3, 4]
    output r = relu(x)
    output s = sigmoid(x)
    output t = tanh(x)
    output e = exp(x)
    output n = neg(x)
    output a = abs(x)
    output l = log(p)
    output q = sqrt(p)
    output m = -x
}
"##,
    ),
    (
        "golden/elementwise/unary_grad/model.dl",
        r##"# one parameter per op, so a wrong gradient names its op; relu'(0) = 0
model unary_grad {
    param a: f32[2, 3, 4]
    param b: f32[2, 3, 4] = normal(1.0)
    param c: f32[2, 3, 4] = normal(1.0)
    param d: f32[2, 3, 4] = normal(1.0)
    param e: f32[2, 3, 4] = uniform(0.5, 2.0)
    param f: f32[2, 3, 4] = normal(1.0)
    param g: f32[2, 3, 4] = normal(1.0)
    input dy: f32[2, 3, 4]
    output ra = relu(a)
    loss = sum(ra * dy) + sum(sigmoid(b) * dy) + sum(tanh(c) * dy) + sum(exp(d) * dy) + sum(log(e) * dy) + sum(sqrt(e) * dy) + sum(abs(f) * dy) + sum(neg(g) * dy)
}
"##,
    ),
    (
        "golden/gather/ids_1d/model.dl",
        r##"model gather_1d {
    input ids: i32[5]
    input table: f32[6, 3]
    output y = gather(table, ids)
}
"##,
    ),
    (
        "golden/gather/repeated_ids_grad/model.dl",
        r##"# repeated ids: their gradients add up in the table row
model gather_rep {
    input ids: i32[2, 4]
    input dy: f32[2, 4, 3]
    param table: f32[6, 3] = normal(1.0)
    output y = gather(table, ids)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/layers/conv2d/model.dl",
        r##"model conv2d_layers {
    input x: f32[N, 2, 6, 6]
    input dy: f32[N, 3, 2, 2]
    c1 = x |> conv2d(4, kernel=3, pad=1) |> relu
    output c2 = c1 |> conv2d(3, kernel=3, stride=2)
    loss = sum(c2 * dy)
}
"##,
    ),
    (
        "golden/layers/dense/model.dl",
        r##"model dense_layers {
    input x: f32[N, 6]
    input s: f32[N, T, 6]
    input target: f32[N, 3]
    input ds: f32[N, T, 2]
    d1 = x |> dense(5) |> relu
    output y = d1 |> dense(3)
    output z = dense(s, 2)
    loss = mse(y, target) + sum(z * ds)
}
"##,
    ),
    (
        "golden/layers/embedding/model.dl",
        r##"model embedding_layer {
    input ids: i32[N, T]
    input dy: f32[N, T, 3]
    e = ids |> embedding(9, 3)
    output y = e * 2
    loss = sum(e * dy)
}
"##,
    ),
    (
        "golden/layers/gru/model.dl",
        r##"model gru_layer {
    input x: f32[N, T, 6]
    input dy: f32[N, T, 4]
    h = x |> gru(4)
    output y = h
    loss = sum(h * dy)
}
"##,
    ),
    (
        "golden/layers/layer_norm/model.dl",
        r##"model layer_norm_layer {
    input x: f32[N, T, 6]
    input dy: f32[N, T, 6]
    n1 = layer_norm(x)
    n2 = x |> layer_norm(eps=0.01)
    output y = n1
    loss = sum(n1 * dy) + sum(n2 * n2 * dy)
}
"##,
    ),
    (
        "golden/layers/lstm/model.dl",
        r##"model lstm_layer {
    input x: f32[N, T, 6]
    input target: f32[N, 5]
    h = x |> lstm(5)
    output y = last(h)
    loss = mse(y, target)
}
"##,
    ),
    (
        "golden/layers/self_attention/model.dl",
        r##"model self_attention_layer {
    input x: f32[N, T, 6]
    input dy: f32[N, T, 6]
    a = x |> self_attention(heads=2, causal=true)
    output y = a
    loss = sum(a * dy)
}
"##,
    ),
    (
        "golden/losses/cross_entropy_grad/model.dl",
        r##"model ce_grad {
    param logits: f32[4, 5] = normal(2.0)
    input labels: i32[4]
    loss = cross_entropy(logits, labels)
}
"##,
    ),
    (
        "golden/losses/forward/model.dl",
        r##"model losses {
    input logits: f32[4, 5]
    input scores: f32[4, 5]
    input labels: i32[4]
    input pred: f32[4, 5]
    input target: f32[4, 5]
    output ce = cross_entropy(logits, labels)
    output m = mse(pred, target)
    output h = hinge(scores, labels)
}
"##,
    ),
    (
        "golden/losses/hinge_grad/model.dl",
        r##"# scores near the margin on both sides; none exactly on the kink
model hinge_grad {
    param scores: f32[4, 5] = normal(0.7)
    input labels: i32[4]
    output h = hinge(scores, labels)
    loss = h
}
"##,
    ),
    (
        "golden/losses/mse_grad/model.dl",
        r##"model mse_grad {
    param pred: f32[4, 5, 2] = normal(1.0)
    input target: f32[4, 5, 2]
    loss = mse(pred, target)
}
"##,
    ),
    (
        "golden/matmul/forms/model.dl",
        r##"model matmul_forms {
    input a: f32[3, 4]
    input b: f32[4, 5]
    input ba: f32[2, 3, 4]
    input bb: f32[2, 4, 5]
    input c: f32[2, 1, 3, 4]
    input d: f32[2, 4, 5]
    input v: f32[4]
    input u: f32[5]
    output mm = a @ b
    output bmm = matmul(ba, bb)
    output bcast = c @ d
    output shared = ba @ b
    output vm = v @ b
    output mv = b @ u
    output vv = v @ v
}
"##,
    ),
    (
        "golden/matmul/grad/model.dl",
        r##"# batch-broadcast operands: their gradients sum over the broadcast batch dims
model matmul_grad {
    input x: f32[2, 3, 4]
    input u: f32[5]
    input dy: f32[2, 3, 5]
    input dg: f32[2, 2, 3, 4]
    param w: f32[4, 5] = normal(0.5)
    param g: f32[2, 1, 3, 3] = normal(0.5)
    param v: f32[4] = normal(1.0)
    output y = x @ w
    z = w @ u
    loss = sum(y * dy) + sum(g @ x * dg) + sum(z * v) + v @ v
}
"##,
    ),
    (
        "golden/minmax/broadcast/model.dl",
        r##"model minmax {
    input a: f32[2, 3, 4]
    input b: f32[3, 1]
    input c: f32[4]
    output hi = maximum(a, b)
    output lo = minimum(a, c)
    output clamp = minimum(maximum(a, b), c)
    output bc = maximum(b, c)
}
"##,
    ),
    (
        "golden/minmax/grad/model.dl",
        r##"# no ties: the gradient at a tie is not specified
model minmax_grad {
    param p: f32[3, 4] = normal(1.0)
    param q: f32[4] = normal(1.0)
    input x: f32[2, 3, 4]
    input dy: f32[2, 3, 4]
    output y = maximum(x, p) - minimum(q, x) * 2
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/models/fn_nested/model.dl",
        r##"fn block(x: f32[N, C, H, W], ch: int, k = 3) {
    a = conv2d(x, ch, kernel=k, pad=1)
    r = a |> relu
    return r
}

fn scale(x: f32[..., D]) {
    param g: f32[D] = ones
    return x * g
}

fn stage(x, ch) {
    inner = block(x, ch)
    s = scale(inner)
    return s |> max_pool2d(2)
}

# parameter names: b1.a.weight, b2.a.bias, st.inner.a.weight, st.s.g, logits.weight, w
model nested {
    input x: f32[N, 2, 8, 8]
    input label: i32[N]
    param w: f32[3] = normal(1.0)
    b1 = block(x, 3)
    b2 = block(b1, 4, k=3)
    st = stage(b2, 3)
    logits = st |> global_avg_pool |> dense(3)
    output scores = logits * w
    loss = cross_entropy(scores, label)
}
"##,
    ),
    (
        "golden/models/model_params/model.dl",
        r##"# parameters declared in the model are named by their own names; a train
# block (no regularizer) does not change the loss or gradients of a run
model plain_params {
    input x: f32[N, 3]
    input label: i32[N]
    param w1: f32[3, 4] = glorot_uniform
    param b1: f32[4]
    param w2: f32[4, 2] = normal(0.5)
    h = tanh(x @ w1 + b1)
    output logits = h @ w2
    loss = hinge(logits, label)
    train {
        optimizer = sgd(lr=0.1, momentum=0.9)
    }
}
"##,
    ),
    (
        "golden/models/two_models/model.dl",
        r##"# case.toml picks the second model of the file
model first {
    input x: f32[N, 4]
    output y = x |> dense(2)
}

model second {
    input x: f32[N, 4]
    input target: f32[N, 3]
    h = x |> dense(3) |> tanh
    output y = h
    loss = mse(h, target)
}
"##,
    ),
    (
        "golden/pool/avg_overlap_grad/model.dl",
        r##"model pool_avg_overlap_grad {
    param x: f32[2, 2, 7, 6]
    input dy: f32[2, 2, 6, 5]
    output y = avg_pool2d(x, 2, stride=1)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/pool/avg_pad_grad/model.dl",
        r##"# padding cells are not counted in the mean
model pool_avg_pad_grad {
    param x: f32[2, 2, 7, 6]
    input dy: f32[2, 2, 4, 3]
    output y = avg_pool2d(x, 3, stride=2, pad=1)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/pool/forward/model.dl",
        r##"model pools {
    input x: f32[2, 3, 6, 6]
    output mp = max_pool2d(x, 2)
    output mp3 = max_pool2d(x, 3, stride=1)
    output ap = avg_pool2d(x, 2)
    output ap3 = avg_pool2d(x, 3, stride=2, pad=1)
    output mpp = max_pool2d(x, 3, stride=2, pad=1)
    output g = global_avg_pool(x)
}
"##,
    ),
    (
        "golden/pool/global_avg_grad/model.dl",
        r##"model pool_global_avg {
    param x: f32[2, 2, 7, 6]
    input dy: f32[2, 2]
    output y = global_avg_pool(x)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/pool/max_overlap_pad_grad/model.dl",
        r##"model pool_max_overlap_pad_grad {
    param x: f32[2, 2, 7, 6]
    input dy: f32[2, 2, 4, 3]
    output y = max_pool2d(x, 3, stride=2, pad=1)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/pool/max_pad_negative/model.dl",
        r##"# every value is negative, so a zero-padded max would be wrong
model max_pad_neg {
    input x: f32[2, 3, 6, 6]
    output y = max_pool2d(x, 3, stride=2, pad=1)
    output z = max_pool2d(x, 2, stride=1, pad=1)
}
"##,
    ),
    (
        "golden/pool/max_plain_grad/model.dl",
        r##"# non-overlapping windows with ties
model pool_max_plain_grad {
    param x: f32[2, 1, 4, 6]
    input dy: f32[2, 1, 2, 3]
    output y = max_pool2d(x, 2)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/pool/max_ties_grad/model.dl",
        r##"# exact ties: each window's gradient goes to its first maximum (row-major)
model pool_max_ties_grad {
    param x: f32[2, 2, 6, 6]
    input dy: f32[2, 2, 5, 5]
    output y = max_pool2d(x, 2, stride=1)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/pool/max_ties_pad_grad/model.dl",
        r##"# ties and padding: padding never wins, the first real maximum does
model pool_max_ties_pad_grad {
    param x: f32[1, 2, 5, 5]
    input dy: f32[1, 2, 3, 3]
    output y = max_pool2d(x, 3, stride=2, pad=1)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/reduce/axes/model.dl",
        r##"model reduce {
    input x: f32[2, 3, 4]
    output s_all = sum(x)
    output s1 = sum(x, axis=1)
    output s02k = sum(x, axis=[0, 2], keepdims=true)
    output m_last = mean(x, axis=-1)
    output m12 = mean(x, axis=[1, 2])
    output m_allk = mean(x, keepdims=true)
    output x1 = max(x, axis=1)
    output x02k = max(x, axis=[0, 2], keepdims=true)
    output x_all = max(x)
}
"##,
    ),
    (
        "golden/reduce/grad/model.dl",
        r##"# distinct values: the gradient of max at a tie is not specified
model reduce_grad {
    param p: f32[2, 3, 4] = normal(1.0)
    input d1: f32[2, 4]
    input d2: f32[1, 3, 1]
    input d3: f32[2, 3]
    output m = max(p, axis=-1)
    loss = sum(sum(p, axis=1) * d1) + sum(mean(p, axis=[0, 2], keepdims=true) * d2) + sum(m * d3) + max(p) + mean(p)
}
"##,
    ),
    (
        "golden/rnn/gru_t1/model.dl",
        r##"model gru_t1 {
    input x: f32[N, T, 4]
    input dy: f32[N, T, 5]
    param w_x: f32[4, 15] = normal(0.5)
    param w_h: f32[5, 15] = normal(0.5)
    param b: f32[15] = normal(0.5)
    output y = gru_seq(x, w_x, w_h, b)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/rnn/gru_t6/model.dl",
        r##"model gru_t6 {
    input x: f32[N, T, 4]
    input dy: f32[N, T, 5]
    param w_x: f32[4, 15] = normal(0.5)
    param w_h: f32[5, 15] = normal(0.5)
    param b: f32[15] = normal(0.5)
    output y = gru_seq(x, w_x, w_h, b)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/rnn/lstm_t1/model.dl",
        r##"model lstm_t1 {
    input x: f32[N, T, 4]
    input dy: f32[N, T, 5]
    param w_x: f32[4, 20] = normal(0.5)
    param w_h: f32[5, 20] = normal(0.5)
    param b: f32[20] = normal(0.5)
    output y = lstm_seq(x, w_x, w_h, b)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/rnn/lstm_t6/model.dl",
        r##"model lstm_t6 {
    input x: f32[N, T, 4]
    input dy: f32[N, T, 5]
    param w_x: f32[4, 20] = normal(0.5)
    param w_h: f32[5, 20] = normal(0.5)
    param b: f32[20] = normal(0.5)
    output y = lstm_seq(x, w_x, w_h, b)
    loss = sum(y * dy)
}
"##,
    ),
    (
        "golden/shape/forms/model.dl",
        r##"model shapes {
    input x: f32[2, 3, 4]
    input y: f32[2, 5, 4]
    output t = transpose(x)
    output tp = transpose(x, [2, 0, 1])
    output r = reshape(x, [-1, 6])
    output r2 = reshape(x, [3, -1, 2])
    output fl = flatten(x)
    output c1 = concat([x, y], 1)
    output c0 = concat([x, x, x], 0)
    output cl = concat([y, y], -1)
    output s = slice(y, 1, 1, 4)
    output s2 = slice(x, 2, 0, 1)
    output l = last(y)
}
"##,
    ),
    (
        "golden/shape/grad/model.dl",
        r##"model shapes_grad {
    param p: f32[2, 3, 4] = normal(1.0)
    param q: f32[2, 4, 5] = normal(1.0)
    input d1: f32[2, 8, 4]
    input d2: f32[4, 6]
    input d3: f32[2, 12]
    input d4: f32[2, 4]
    j = concat([slice(p, 1, 0, 3), transpose(q)], 1)
    output l = last(j)
    loss = sum(j * d1) + sum(transpose(reshape(p, [-1, 4]), [1, 0]) * d2) + sum(flatten(p) * d3) + sum(l * d4)
}
"##,
    ),
    (
        "golden/softmax/grad/model.dl",
        r##"model softmax_grad {
    param x: f32[3, 5]
    param z: f32[2, 3, 4] = normal(2.0)
    input dx: f32[3, 5]
    input dz: f32[2, 3, 4]
    output p = softmax(x)
    output lz = log_softmax(z, axis=1)
    loss = sum(p * dx) + sum(lz * dz)
}
"##,
    ),
    (
        "golden/softmax/large_magnitude/model.dl",
        r##"# rows near -1000 / 500 / 1000: a naive exp overflows
model softmax_big {
    input x: f32[3, 5]
    input z: f32[2, 3, 4]
    output p = softmax(x)
    output lp = log_softmax(x)
    output p1 = softmax(z, axis=1)
    output lp0 = log_softmax(z, axis=0)
    output pneg = softmax(z, axis=-2)
}
"##,
    ),
    (
        "golden/workloads/gru_small/model.dl",
        r##"# bench/workloads/gru.dl with 64 -> 8 features and gru(128) -> gru(12)
model gru_clf {
    input x: f32[N, T, 8]
    input label: i32[N]

    h = x |> gru(12)
    logits = h |> last |> dense(10)

    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "golden/workloads/lenet_small/model.dl",
        r##"# bench/workloads/lenet.dl on 16x16 images with dense(120) -> dense(16), dense(84) -> dense(12)
model lenet {
    input x: f32[N, 1, 16, 16]
    input label: i32[N]

    c1 = x |> conv2d(6, kernel=5, pad=2) |> relu |> max_pool2d(2)
    c2 = c1 |> conv2d(16, kernel=5) |> relu |> max_pool2d(2)
    f1 = c2 |> flatten |> dense(16) |> relu
    f2 = f1 |> dense(12) |> relu
    logits = f2 |> dense(10)

    output probs = softmax(logits)
    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "golden/workloads/lstm_small/model.dl",
        r##"# bench/workloads/lstm.dl with 64 -> 8 features and lstm(128) -> lstm(12)
model lstm_clf {
    input x: f32[N, T, 8]
    input label: i32[N]

    h = x |> lstm(12)
    logits = h |> last |> dense(10)

    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "golden/workloads/mlp_small/model.dl",
        r##"# bench/workloads/mlp.dl with 784 -> 24 inputs and 256 -> 16 hidden units
model mlp {
    input x: f32[N, 24]
    input label: i32[N]

    h = x |> dense(16) |> relu
    logits = h |> dense(10)

    output probs = softmax(logits)
    loss = cross_entropy(logits, label)
}
"##,
    ),
    (
        "golden/workloads/transformer_small/model.dl",
        r##"# bench/workloads/transformer.dl with vocab 1000 -> 40, width 64 -> 16, dense(256) -> dense(32)
fn block(x, heads) {
    n1 = layer_norm(x)
    a = n1 |> self_attention(heads=heads, causal=true)
    r1 = x + a
    n2 = layer_norm(r1)
    up = n2 |> dense(32) |> relu
    down = up |> dense(16)
    return r1 + down
}

model tiny_lm {
    input tokens: i32[N, T]
    input target: i32[N, T]

    e = tokens |> embedding(40, 16)
    b1 = block(e, 4)
    n = layer_norm(b1)
    logits = n |> dense(40)

    loss = cross_entropy(reshape(logits, [-1, 40]), reshape(target, [-1]))
}
"##,
    ),
    (
        "golden/workloads/vgg_small/model.dl",
        r##"# bench/workloads/vgg.dl on 8x8 images with channels 32/64 -> 4/6
model vgg {
    input x: f32[N, 3, 8, 8]
    input label: i32[N]

    a1 = x |> conv2d(4, kernel=3, pad=1) |> relu
    a2 = a1 |> conv2d(4, kernel=3, pad=1) |> relu |> max_pool2d(2)
    b1 = a2 |> conv2d(6, kernel=3, pad=1) |> relu
    b2 = b1 |> conv2d(6, kernel=3, pad=1) |> relu |> max_pool2d(2)
    logits = b2 |> flatten |> dense(10)

    loss = cross_entropy(logits, label)
}
"##,
    ),
];
