//! Convolution and pooling (NCHW) with their gradients.
//!
//! Every kernel here walks the same loop nest as its forward op: output
//! position, then window cell, mapping the cell to an input position and
//! skipping cells that fall into the padding. The gradients are the exact
//! adjoints of that walk (`+=` into the input position instead of reading
//! it), which makes them easy to check against the forward op.

use super::elementwise::beats;
use super::{floats, Array, InterpError};
use crate::ir::{Conv2d, Pool2d};
use crate::tensor::numel;

/// The input coordinate of window cell `k` of output position `o`, or `None`
/// when it falls into the padding.
fn source(
    o: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    size: usize,
) -> Option<usize> {
    (o * stride + k * dilation)
        .checked_sub(pad)
        .filter(|&i| i < size)
}

/// `[a, b, c, d]` → flat index in a row-major array of shape `s`.
fn at4(s: &[usize], a: usize, b: usize, c: usize, d: usize) -> usize {
    ((a * s[1] + b) * s[2] + c) * s[3] + d
}

/// `y[n,o,oh,ow] = Σ_{c,kh,kw} x[n, c, oh·s + kh·d − pt, ow·s + kw·d − pl] · w[o,c,kh,kw]`
pub(super) fn conv(
    x: &Array,
    w: &Array,
    c: &Conv2d,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let (xs, ws) = (floats(op, 0, x)?, floats(op, 1, w)?);
    let (xsh, wsh, ysh) = (&x.shape, &w.shape, out_shape);
    let mut y = vec![0.0; numel(ysh)];
    for n in 0..ysh[0] {
        for o in 0..ysh[1] {
            for oh in 0..ysh[2] {
                for ow in 0..ysh[3] {
                    let mut acc = 0.0;
                    for ci in 0..wsh[1] {
                        for kh in 0..wsh[2] {
                            let Some(ih) = source(oh, kh, c.stride, c.dilation, c.pad[0], xsh[2])
                            else {
                                continue;
                            };
                            for kw in 0..wsh[3] {
                                let Some(iw) =
                                    source(ow, kw, c.stride, c.dilation, c.pad[1], xsh[3])
                                else {
                                    continue;
                                };
                                acc += xs[at4(xsh, n, ci, ih, iw)] * ws[at4(wsh, o, ci, kh, kw)];
                            }
                        }
                    }
                    y[at4(ysh, n, o, oh, ow)] = acc;
                }
            }
        }
    }
    Ok(Array::f(ysh.to_vec(), y))
}

/// `(dy, w) -> dx`: the adjoint of [`conv`] with respect to `x`.
pub(super) fn conv_grad_input(
    dy: &Array,
    w: &Array,
    c: &Conv2d,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let (dys, ws) = (floats(op, 0, dy)?, floats(op, 1, w)?);
    let (xsh, wsh, ysh) = (out_shape, &w.shape, &dy.shape);
    let mut dx = vec![0.0; numel(xsh)];
    for n in 0..ysh[0] {
        for o in 0..ysh[1] {
            for oh in 0..ysh[2] {
                for ow in 0..ysh[3] {
                    let g = dys[at4(ysh, n, o, oh, ow)];
                    for ci in 0..wsh[1] {
                        for kh in 0..wsh[2] {
                            let Some(ih) = source(oh, kh, c.stride, c.dilation, c.pad[0], xsh[2])
                            else {
                                continue;
                            };
                            for kw in 0..wsh[3] {
                                let Some(iw) =
                                    source(ow, kw, c.stride, c.dilation, c.pad[1], xsh[3])
                                else {
                                    continue;
                                };
                                dx[at4(xsh, n, ci, ih, iw)] += g * ws[at4(wsh, o, ci, kh, kw)];
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Array::f(xsh.to_vec(), dx))
}

/// `(x, dy) -> dw`: the adjoint of [`conv`] with respect to `w`.
pub(super) fn conv_grad_filter(
    x: &Array,
    dy: &Array,
    c: &Conv2d,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let (xs, dys) = (floats(op, 0, x)?, floats(op, 1, dy)?);
    let (xsh, wsh, ysh) = (&x.shape, out_shape, &dy.shape);
    let mut dw = vec![0.0; numel(wsh)];
    for n in 0..ysh[0] {
        for o in 0..ysh[1] {
            for oh in 0..ysh[2] {
                for ow in 0..ysh[3] {
                    let g = dys[at4(ysh, n, o, oh, ow)];
                    for ci in 0..wsh[1] {
                        for kh in 0..wsh[2] {
                            let Some(ih) = source(oh, kh, c.stride, c.dilation, c.pad[0], xsh[2])
                            else {
                                continue;
                            };
                            for kw in 0..wsh[3] {
                                let Some(iw) =
                                    source(ow, kw, c.stride, c.dilation, c.pad[1], xsh[3])
                                else {
                                    continue;
                                };
                                dw[at4(wsh, o, ci, kh, kw)] += g * xs[at4(xsh, n, ci, ih, iw)];
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Array::f(wsh.to_vec(), dw))
}

/// The shape rule does not check `pad < window`; without it a window could
/// lie wholly in the padding and have no cells to take a max or mean of.
fn check_pool(p: &Pool2d, op: &'static str) -> Result<(), InterpError> {
    if p.pad >= p.window {
        return Err(InterpError::Attribute {
            op,
            message: format!(
                "padding {} must be smaller than the window {}",
                p.pad, p.window
            ),
        });
    }
    Ok(())
}

/// The input cells `(ih, iw)` of the pooling window at output `(oh, ow)`
/// that lie inside the input, in row-major window order.
fn window(p: &Pool2d, oh: usize, ow: usize, h: usize, w: usize) -> Vec<(usize, usize)> {
    let mut cells = Vec::new();
    for kh in 0..p.window {
        let Some(ih) = source(oh, kh, p.stride, 1, p.pad, h) else {
            continue;
        };
        for kw in 0..p.window {
            if let Some(iw) = source(ow, kw, p.stride, 1, p.pad, w) {
                cells.push((ih, iw));
            }
        }
    }
    cells
}

/// The first maximum of a window (row-major order; NaN wins, so it
/// propagates). `None` only for an empty window.
fn first_max(
    xs: &[f64],
    sh: &[usize],
    n: usize,
    c: usize,
    cells: &[(usize, usize)],
) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for &(ih, iw) in cells {
        let v = xs[at4(sh, n, c, ih, iw)];
        match best {
            Some((bh, bw)) if !beats(v, xs[at4(sh, n, c, bh, bw)]) => {}
            _ => best = Some((ih, iw)),
        }
    }
    best
}

pub(super) fn max_pool(
    x: &Array,
    p: &Pool2d,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    check_pool(p, op)?;
    let xs = floats(op, 0, x)?;
    let (xsh, ysh) = (&x.shape, out_shape);
    let mut y = vec![0.0; numel(ysh)];
    for n in 0..ysh[0] {
        for c in 0..ysh[1] {
            for oh in 0..ysh[2] {
                for ow in 0..ysh[3] {
                    let cells = window(p, oh, ow, xsh[2], xsh[3]);
                    y[at4(ysh, n, c, oh, ow)] = match first_max(xs, xsh, n, c, &cells) {
                        Some((ih, iw)) => xs[at4(xsh, n, c, ih, iw)],
                        None => f64::NEG_INFINITY,
                    };
                }
            }
        }
    }
    Ok(Array::f(ysh.to_vec(), y))
}

/// `(x, dy) -> dx`: each window's gradient goes to its first maximum.
pub(super) fn max_pool_grad(
    x: &Array,
    dy: &Array,
    p: &Pool2d,
    op: &'static str,
) -> Result<Array, InterpError> {
    check_pool(p, op)?;
    let (xs, dys) = (floats(op, 0, x)?, floats(op, 1, dy)?);
    let (xsh, ysh) = (&x.shape, &dy.shape);
    let mut dx = vec![0.0; xs.len()];
    for n in 0..ysh[0] {
        for c in 0..ysh[1] {
            for oh in 0..ysh[2] {
                for ow in 0..ysh[3] {
                    let cells = window(p, oh, ow, xsh[2], xsh[3]);
                    if let Some((ih, iw)) = first_max(xs, xsh, n, c, &cells) {
                        dx[at4(xsh, n, c, ih, iw)] += dys[at4(ysh, n, c, oh, ow)];
                    }
                }
            }
        }
    }
    Ok(Array::f(xsh.clone(), dx))
}

/// Mean over the window cells inside the input (padding is not counted).
pub(super) fn avg_pool(
    x: &Array,
    p: &Pool2d,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    check_pool(p, op)?;
    let xs = floats(op, 0, x)?;
    let (xsh, ysh) = (&x.shape, out_shape);
    let mut y = vec![0.0; numel(ysh)];
    for n in 0..ysh[0] {
        for c in 0..ysh[1] {
            for oh in 0..ysh[2] {
                for ow in 0..ysh[3] {
                    let cells = window(p, oh, ow, xsh[2], xsh[3]);
                    let mut sum = 0.0;
                    for &(ih, iw) in &cells {
                        sum += xs[at4(xsh, n, c, ih, iw)];
                    }
                    y[at4(ysh, n, c, oh, ow)] = sum / cells.len() as f64;
                }
            }
        }
    }
    Ok(Array::f(ysh.to_vec(), y))
}

/// `dy -> dx`: each window's gradient shared equally by its cells inside
/// the input.
pub(super) fn avg_pool_grad(
    dy: &Array,
    p: &Pool2d,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    check_pool(p, op)?;
    let dys = floats(op, 0, dy)?;
    let (xsh, ysh) = (out_shape, &dy.shape);
    let mut dx = vec![0.0; numel(xsh)];
    for n in 0..ysh[0] {
        for c in 0..ysh[1] {
            for oh in 0..ysh[2] {
                for ow in 0..ysh[3] {
                    let cells = window(p, oh, ow, xsh[2], xsh[3]);
                    let g = dys[at4(ysh, n, c, oh, ow)] / cells.len() as f64;
                    for &(ih, iw) in &cells {
                        dx[at4(xsh, n, c, ih, iw)] += g;
                    }
                }
            }
        }
    }
    Ok(Array::f(xsh.to_vec(), dx))
}
