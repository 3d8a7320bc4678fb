//! Dense host tensors: the values that flow in and out of every backend.
//!
//! Row-major, contiguous, f32 or i32. Scalars have an empty shape.

use std::fmt;

/// Element type of a tensor or IR value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    I32,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
        })
    }
}

/// The elements of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// A dense row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// Number of elements of a shape (1 for a scalar).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A byte count for messages: `512 B`, `3.5 MiB`, `40.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

impl Tensor {
    /// An f32 tensor; panics if `data.len()` does not match the shape, which
    /// is a programming error, not a user error.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(
            numel(&shape),
            data.len(),
            "tensor data does not fit its shape"
        );
        Tensor {
            shape,
            data: Data::F32(data),
        }
    }

    /// An i32 tensor; panics on a length mismatch (a programming error).
    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        assert_eq!(
            numel(&shape),
            data.len(),
            "tensor data does not fit its shape"
        );
        Tensor {
            shape,
            data: Data::I32(data),
        }
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = numel(&shape);
        match dtype {
            DType::F32 => Tensor::f32(shape, vec![0.0; n]),
            DType::I32 => Tensor::i32(shape, vec![0; n]),
        }
    }

    pub fn scalar(v: f32) -> Tensor {
        Tensor::f32(vec![], vec![v])
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::I32(_) => DType::I32,
        }
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I32(_) => None,
        }
    }

    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I32(v) => Some(v),
            Data::F32(_) => None,
        }
    }
}
