//! Layout ops. They work on either dtype, so each is written as a map from
//! output position to source position (`None` for a zero), applied by
//! [`take`].

use super::{broadcast_source, unravel, Array, ArrayData, InterpError};
use crate::tensor::numel;

/// The array whose element `o` is `src[map[o]]`, or zero where `map[o]` is
/// `None`.
fn take(src: &ArrayData, map: &[Option<usize>], shape: &[usize]) -> Array {
    let data = match src {
        ArrayData::F(v) => ArrayData::F(map.iter().map(|m| m.map_or(0.0, |i| v[i])).collect()),
        ArrayData::I(v) => ArrayData::I(map.iter().map(|m| m.map_or(0, |i| v[i])).collect()),
    };
    Array {
        shape: shape.to_vec(),
        data,
    }
}

pub(super) fn transpose(x: &Array, perm: &[usize], out_shape: &[usize]) -> Array {
    let map: Vec<Option<usize>> = (0..numel(out_shape))
        .map(|flat| {
            let out_idx = unravel(flat, out_shape);
            // Output axis d is input axis perm[d].
            let mut in_idx = vec![0; x.shape.len()];
            for (d, &p) in perm.iter().enumerate() {
                in_idx[p] = out_idx[d];
            }
            Some(super::ravel(&in_idx, &x.shape))
        })
        .collect();
    take(&x.data, &map, out_shape)
}

pub(super) fn expand(x: &Array, out_shape: &[usize]) -> Array {
    let map: Vec<Option<usize>> = (0..numel(out_shape))
        .map(|flat| Some(broadcast_source(&unravel(flat, out_shape), &x.shape)))
        .collect();
    take(&x.data, &map, out_shape)
}

pub(super) fn slice(x: &Array, axis: usize, start: usize, out_shape: &[usize]) -> Array {
    let map: Vec<Option<usize>> = (0..numel(out_shape))
        .map(|flat| {
            let mut idx = unravel(flat, out_shape);
            idx[axis] += start;
            Some(super::ravel(&idx, &x.shape))
        })
        .collect();
    take(&x.data, &map, out_shape)
}

pub(super) fn pad_slice(
    x: &Array,
    axis: usize,
    start: usize,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let len = x.shape[axis];
    if start + len > out_shape[axis] {
        return Err(InterpError::Attribute {
            op,
            message: format!(
                "a slice of size {len} at start {start} does not fit axis {axis} of size {}",
                out_shape[axis]
            ),
        });
    }
    let map: Vec<Option<usize>> = (0..numel(out_shape))
        .map(|flat| {
            let mut idx = unravel(flat, out_shape);
            if idx[axis] < start || idx[axis] >= start + len {
                return None;
            }
            idx[axis] -= start;
            Some(super::ravel(&idx, &x.shape))
        })
        .collect();
    Ok(take(&x.data, &map, out_shape))
}

pub(super) fn concat(
    parts: &[&Array],
    axis: usize,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    // Where each operand starts along the concatenation axis.
    let mut offsets = Vec::with_capacity(parts.len());
    let mut total = 0;
    for p in parts {
        offsets.push(total);
        total += p.shape[axis];
    }
    let mut from: Vec<(usize, usize)> = Vec::with_capacity(numel(out_shape));
    for flat in 0..numel(out_shape) {
        let mut idx = unravel(flat, out_shape);
        let k = (0..parts.len())
            .rev()
            .find(|&k| offsets[k] <= idx[axis] && parts[k].shape[axis] > 0)
            .unwrap_or(0);
        idx[axis] -= offsets[k];
        from.push((k, super::ravel(&idx, &parts[k].shape)));
    }
    let data = match &parts[0].data {
        ArrayData::F(_) => {
            let mut v = Vec::with_capacity(from.len());
            for &(k, i) in &from {
                v.push(super::floats(op, k, parts[k])?[i]);
            }
            ArrayData::F(v)
        }
        ArrayData::I(_) => {
            let mut v = Vec::with_capacity(from.len());
            for &(k, i) in &from {
                v.push(super::ints(op, k, parts[k])?[i]);
            }
            ArrayData::I(v)
        }
    };
    Ok(Array {
        shape: out_shape.to_vec(),
        data,
    })
}
