//! Tensor files: safetensors (named tensors) and NumPy `.npy` (one tensor).
//!
//! Only f32 and i32 travel through these files (CLI.md). Every failure is an
//! [`IoError`] whose message names the file and, where there is one, the
//! tensor. Writes go to a temporary file in the target's directory and are
//! renamed over it, so a failed or interrupted write never leaves a
//! half-written file behind.
//!
//! ```
//! use dlc::io::{read_tensors, write_tensors, TensorMap};
//! use dlc::tensor::Tensor;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("batch.safetensors");
//! let batch = TensorMap::from([
//!     ("x".to_string(), Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])),
//!     ("label".to_string(), Tensor::i32(vec![2], vec![0, 1])),
//! ]);
//! write_tensors(&path, &batch)?;
//! assert_eq!(read_tensors(&path)?, batch);
//! // One tensor as .npy, named by the file's stem when read back.
//! let npy = dir.path().join("label.npy");
//! write_tensors(&npy, &TensorMap::from([("label".to_string(), batch["label"].clone())]))?;
//! assert_eq!(read_tensors(&npy)?["label"], batch["label"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::tensor::{numel, DType, Data, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Named tensors, sorted by name (the form every file and backend uses).
pub type TensorMap = BTreeMap<String, Tensor>;

/// What can go wrong reading or writing a tensor file.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write `{}`: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{}` is not a valid {format} file: {detail}", path.display())]
    Malformed {
        path: PathBuf,
        format: &'static str,
        detail: String,
    },
    #[error("tensor `{name}` in `{}` has dtype {dtype}, but only F32 and I32 are supported", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("`{}` has no tensor named `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor `{name}` in `{}` has dtype {actual}, expected {expected}", path.display())]
    WrongDtype {
        path: PathBuf,
        name: String,
        expected: DType,
        actual: DType,
    },
}

/// Read a tensor file by its extension: `.npy` gives one tensor named by the
/// file's stem (`x.npy` is the tensor `x`); anything else is read as
/// safetensors.
pub fn read_tensors(path: &Path) -> Result<TensorMap, IoError> {
    if is_npy(path) {
        let t = read_npy(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(TensorMap::from([(name, t)]))
    } else {
        read_safetensors(path)
    }
}

/// Write named tensors by extension: `.npy` takes exactly one tensor.
pub fn write_tensors(path: &Path, tensors: &TensorMap) -> Result<(), IoError> {
    if is_npy(path) {
        let mut it = tensors.values();
        match (it.next(), it.next()) {
            (Some(t), None) => write_npy(path, t),
            _ => Err(IoError::Write {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!(
                    "a .npy file holds exactly one tensor, but there are {}; use .safetensors",
                    tensors.len()
                )),
            }),
        }
    } else {
        write_safetensors(path, tensors, None)
    }
}

fn is_npy(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, IoError> {
    fs::read(path).map_err(|source| IoError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Read every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<TensorMap, IoError> {
    Ok(read_safetensors_with_metadata(path)?.0)
}

/// Read every tensor of a safetensors file and its `__metadata__` strings.
pub fn read_safetensors_with_metadata(
    path: &Path,
) -> Result<(TensorMap, BTreeMap<String, String>), IoError> {
    let bytes = read_bytes(path)?;
    parse_safetensors(&bytes, path)
}

/// Decode safetensors bytes; `path` is only used in messages.
pub fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<(TensorMap, BTreeMap<String, String>), IoError> {
    let malformed = |detail: String| IoError::Malformed {
        path: path.to_path_buf(),
        format: "safetensors",
        detail,
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| malformed(describe_st(&e)))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| malformed(describe_st(&e)))?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        let t = match view.dtype() {
            StDtype::F32 => Tensor {
                shape: view.shape().to_vec(),
                data: Data::F32(le_f32(view.data())),
            },
            StDtype::I32 => Tensor {
                shape: view.shape().to_vec(),
                data: Data::I32(le_i32(view.data())),
            },
            other => {
                return Err(IoError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        out.insert(name, t);
    }
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok((out, metadata))
}

fn describe_st(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "the file is shorter than the 8-byte header length".into(),
        E::HeaderTooLarge => "the header length is larger than allowed".into(),
        E::InvalidHeaderLength => {
            "the header length points past the end of the file (truncated?)".into()
        }
        E::MetadataIncompleteBuffer => {
            "the tensor data is shorter than the header says (truncated?)".into()
        }
        other => other.to_string(),
    }
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn le_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    match &t.data {
        Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Encode named tensors (and optional metadata strings) as safetensors.
pub fn encode_safetensors(
    tensors: &TensorMap,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let bufs: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let dt = match t.dtype() {
                DType::F32 => StDtype::F32,
                DType::I32 => StDtype::I32,
            };
            (n.clone(), dt, t.shape.clone(), tensor_bytes(t))
        })
        .collect();
    let mut views = Vec::with_capacity(bufs.len());
    for (n, dt, shape, bytes) in &bufs {
        let v =
            TensorView::new(*dt, shape.clone(), bytes).map_err(|e| format!("tensor `{n}`: {e}"))?;
        views.push((n.clone(), v));
    }
    let meta: Option<HashMap<String, String>> =
        metadata.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let mut bytes = safetensors::serialize(views, meta).map_err(|e| e.to_string())?;
    if let Some(m) = metadata {
        sort_metadata(&mut bytes, m);
    }
    Ok(bytes)
}

/// `safetensors` takes the metadata as a `HashMap` and writes it in that
/// map's order, which is random per map: the same checkpoint came out with
/// its header bytes in another order from run to run. The metadata object
/// is the header's first entry; this rewrites it in key order, which has
/// the same length (checked by reading the span back as the same map).
fn sort_metadata(bytes: &mut [u8], metadata: &BTreeMap<String, String>) {
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let Ok(sorted) = serde_json::to_string(metadata) else {
        return;
    };
    let start = 8 + PREFIX.len();
    let end = start + sorted.len();
    if bytes.get(8..start) != Some(PREFIX) || end > bytes.len() {
        return;
    }
    let same = serde_json::from_slice::<BTreeMap<String, String>>(&bytes[start..end])
        .is_ok_and(|m| &m == metadata);
    if same {
        bytes[start..end].copy_from_slice(sorted.as_bytes());
    }
}

/// Write named tensors as safetensors, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &TensorMap,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), IoError> {
    let bytes = encode_safetensors(tensors, metadata).map_err(|e| IoError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(path, &bytes)
}

/// Write `bytes` to a temporary file next to `path`, sync it, then rename it
/// over `path`: readers see either the old file or the complete new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let err = |source| IoError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("the path does not name a file")))?;
    // The pid and a counter keep concurrent writers (threads, processes)
    // from sharing a temporary file.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        n
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// Look up a tensor that must be present, with a message naming the file.
pub fn take<'a>(map: &'a TensorMap, name: &str, path: &Path) -> Result<&'a Tensor, IoError> {
    map.get(name).ok_or_else(|| IoError::MissingTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
    })
}

// ---------------------------------------------------------------- npy ----

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Read a `.npy` file: little-endian `f4`/`i4`, C order, format 1.0–3.0.
pub fn read_npy(path: &Path) -> Result<Tensor, IoError> {
    let bytes = read_bytes(path)?;
    parse_npy(&bytes).map_err(|e| match e {
        NpyError::Malformed(detail) => IoError::Malformed {
            path: path.to_path_buf(),
            format: "npy",
            detail,
        },
        NpyError::Dtype(dtype) => IoError::UnsupportedDtype {
            path: path.to_path_buf(),
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dtype,
        },
    })
}

enum NpyError {
    Malformed(String),
    Dtype(String),
}

fn parse_npy(bytes: &[u8]) -> Result<Tensor, NpyError> {
    let bad = |s: &str| NpyError::Malformed(s.to_string());
    if bytes.len() < 10 || &bytes[..6] != NPY_MAGIC {
        return Err(bad("it does not start with the NumPy magic bytes"));
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("the header is truncated"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(NpyError::Malformed(format!(
                "unsupported format version {v}"
            )))
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| bad("the header is truncated"))?;
    let header =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| bad("the header is not text"))?;
    let h = parse_npy_header(header).map_err(NpyError::Malformed)?;
    if h.fortran_order {
        return Err(bad(
            "Fortran order is not supported; save the array in C order",
        ));
    }
    let dtype = match h.descr.as_str() {
        "<f4" => DType::F32,
        "<i4" => DType::I32,
        other => return Err(NpyError::Dtype(other.to_string())),
    };
    let n = h
        .shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| bad("the shape is too large"))?;
    let data = &bytes[end..];
    let want = n
        .checked_mul(4)
        .ok_or_else(|| bad("the shape is too large"))?;
    if data.len() != want {
        return Err(NpyError::Malformed(format!(
            "shape {:?} needs {want} data bytes but the file has {} (truncated?)",
            h.shape,
            data.len()
        )));
    }
    Ok(match dtype {
        DType::F32 => Tensor {
            shape: h.shape,
            data: Data::F32(le_f32(data)),
        },
        DType::I32 => Tensor {
            shape: h.shape,
            data: Data::I32(le_i32(data)),
        },
    })
}

struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parse the Python dict literal of an npy header, e.g.
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_npy_header(h: &str) -> Result<NpyHeader, String> {
    let mut p = Lit {
        s: h.trim_end_matches(['\n', ' ', '\0']).as_bytes(),
        i: 0,
    };
    p.ws();
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key.as_str() {
            "descr" => descr = Some(p.string()?),
            "fortran_order" => fortran = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            other => return Err(format!("unexpected header key '{other}'")),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err("trailing characters after the header dict".into());
    }
    Ok(NpyHeader {
        descr: descr.ok_or("the header lacks 'descr'")?,
        fortran_order: fortran.ok_or("the header lacks 'fortran_order'")?,
        shape: shape.ok_or("the header lacks 'shape'")?,
    })
}

struct Lit<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lit<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "expected '{}' at byte {} of the header",
                c as char, self.i
            ))
        }
    }
    fn string(&mut self) -> Result<String, String> {
        let q = match self.s.get(self.i) {
            Some(b'\'') => b'\'',
            Some(b'"') => b'"',
            _ => {
                return Err(format!(
                    "expected a string at byte {} of the header",
                    self.i
                ))
            }
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err("unterminated string in the header".into());
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }
    fn boolean(&mut self) -> Result<bool, String> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            Ok(true)
        } else if rest.starts_with(b"False") {
            self.i += 5;
            Ok(false)
        } else {
            Err("'fortran_order' is not True or False".into())
        }
    }
    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                break;
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            let d = std::str::from_utf8(&self.s[start..self.i])
                .ok()
                .and_then(|t| t.parse::<usize>().ok())
                .ok_or("'shape' must be a tuple of non-negative integers")?;
            dims.push(d);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                break;
            }
        }
        Ok(dims)
    }
}

/// Encode one tensor as `.npy` (format 1.0, little-endian, C order).
pub fn encode_npy(t: &Tensor) -> Vec<u8> {
    let descr = match t.dtype() {
        DType::F32 => "<f4",
        DType::I32 => "<i4",
    };
    let shape = match t.shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", t.shape[0]),
        _ => format!(
            "({})",
            t.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Format 1.0 stores the header length in 2 bytes; 2.0 in 4 (huge ranks).
    let (version, len_bytes) = if header.len() + 64 > u16::MAX as usize {
        (2u8, 4)
    } else {
        (1u8, 2)
    };
    // The data must start on a 64-byte boundary (NEP 1); the header ends in '\n'.
    let unpadded = NPY_MAGIC.len() + 2 + len_bytes + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(12 + header.len() + 4 * numel(&t.shape));
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&tensor_bytes(t));
    out
}

/// Write one tensor as `.npy`, atomically.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<(), IoError> {
    write_atomic(path, &encode_npy(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn safetensors_round_trip_keeps_names_shapes_and_values() {
        let d = dir();
        let p = d.path().join("t.safetensors");
        let mut m = TensorMap::new();
        m.insert(
            "a".into(),
            Tensor::f32(vec![2, 2], vec![1.0, -2.5, 3.0, 1e-7]),
        );
        m.insert("ids".into(), Tensor::i32(vec![3], vec![0, -1, 7]));
        m.insert("loss".into(), Tensor::scalar(0.25));
        write_safetensors(&p, &m, None).unwrap();
        assert_eq!(read_safetensors(&p).unwrap(), m);
    }

    #[test]
    fn safetensors_metadata_round_trips() {
        let d = dir();
        let p = d.path().join("t.safetensors");
        let m = TensorMap::from([("w".to_string(), Tensor::scalar(1.0))]);
        let meta = BTreeMap::from([("epoch".to_string(), "3".to_string())]);
        write_safetensors(&p, &m, Some(&meta)).unwrap();
        let (_, back) = read_safetensors_with_metadata(&p).unwrap();
        assert_eq!(back.get("epoch").map(String::as_str), Some("3"));
    }

    /// The same tensors and metadata encode to the same bytes every time,
    /// the metadata in key order (`safetensors` alone writes it in the
    /// random order of a `HashMap`).
    #[test]
    fn safetensors_metadata_is_written_in_key_order() {
        let m = TensorMap::from([("w".to_string(), Tensor::scalar(1.0))]);
        let meta: BTreeMap<String, String> = (0..8)
            .map(|i| (format!("dlc.key{i}"), format!("value {i}")))
            .collect();
        let first = encode_safetensors(&m, Some(&meta)).unwrap();
        for _ in 0..20 {
            assert_eq!(encode_safetensors(&m, Some(&meta)).unwrap(), first);
        }
        let header = String::from_utf8_lossy(&first[8..]);
        let at: Vec<usize> = meta
            .keys()
            .map(|k| header.find(k.as_str()).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{header}");
    }

    #[test]
    fn a_truncated_safetensors_file_is_a_malformed_error() {
        let d = dir();
        let p = d.path().join("t.safetensors");
        let m = TensorMap::from([("w".to_string(), Tensor::f32(vec![4], vec![1.0; 4]))]);
        let bytes = encode_safetensors(&m, None).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = read_safetensors(&p).unwrap_err();
        assert!(matches!(e, IoError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("t.safetensors"), "{e}");
    }

    #[test]
    fn an_f64_safetensors_tensor_is_rejected_by_name() {
        let bytes = [0u8; 8];
        let v = TensorView::new(StDtype::F64, vec![1], &bytes).unwrap();
        let enc = safetensors::serialize([("wide", v)], None).unwrap();
        let e = parse_safetensors(&enc, Path::new("x.safetensors")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("`wide`") && msg.contains("F64"), "{msg}");
    }

    #[test]
    fn a_missing_file_names_the_file() {
        let e = read_tensors(Path::new("/nonexistent/in.safetensors")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/in.safetensors"));
    }

    /// Bytes written by `numpy.save('x.npy', np.array([[1, 2, 3], [4, 5, 6]], dtype='<f4'))`.
    fn numpy_written_f4() -> Vec<u8> {
        let mut b = b"\x93NUMPY\x01\x00v\x00".to_vec();
        let mut h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }".to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        assert_eq!(h.len(), 0x76);
        b.extend_from_slice(h.as_bytes());
        for x in [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b
    }

    #[test]
    fn npy_reads_numpy_layout() {
        let t = parse_npy(&numpy_written_f4()).ok().unwrap();
        assert_eq!(
            t,
            Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
    }

    #[test]
    fn npy_writer_produces_numpy_layout() {
        let t = Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(encode_npy(&t), numpy_written_f4());
    }

    #[test]
    fn npy_of_a_huge_rank_uses_format_2() {
        let t = Tensor::f32(vec![1; 30_000], vec![3.0]);
        let b = encode_npy(&t);
        assert_eq!(b[6], 2);
        assert!(
            (b.len() - 4).is_multiple_of(64),
            "data starts 64-byte aligned"
        );
        assert_eq!(parse_npy(&b).ok(), Some(t));
    }

    #[test]
    fn npy_round_trips_scalars_vectors_and_i32() {
        let d = dir();
        for t in [
            Tensor::scalar(2.5),
            Tensor::i32(vec![4], vec![1, 2, 3, -4]),
            Tensor::f32(vec![0, 3], vec![]),
        ] {
            let p = d.path().join("x.npy");
            write_npy(&p, &t).unwrap();
            assert_eq!(read_npy(&p).unwrap(), t);
            assert_eq!(read_tensors(&p).unwrap().get("x"), Some(&t));
        }
    }

    fn replace(b: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = b
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern present");
        let mut out = b.to_vec();
        out[at..at + from.len()].copy_from_slice(to);
        out
    }

    #[test]
    fn npy_rejects_bad_headers_and_truncation() {
        let good = numpy_written_f4();
        let truncated = &good[..good.len() - 1];
        assert!(
            matches!(parse_npy(truncated), Err(NpyError::Malformed(m)) if m.contains("truncated"))
        );
        assert!(matches!(
            parse_npy(b"garbage garbage"),
            Err(NpyError::Malformed(_))
        ));
        let f8 = replace(&good, b"<f4", b"<f8");
        assert!(matches!(parse_npy(&f8), Err(NpyError::Dtype(d)) if d == "<f8"));
        let fortran = replace(&good, b"False", b"True ");
        assert!(
            matches!(parse_npy(&fortran), Err(NpyError::Malformed(m)) if m.contains("Fortran"))
        );
        assert!(parse_npy_header("{'descr': '<f4', 'shape': (1,), }").is_err());
        assert!(
            parse_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }").is_err()
        );
    }

    #[test]
    fn failed_atomic_write_leaves_no_file() {
        let d = dir();
        let target = d.path().join("missing_dir").join("out.safetensors");
        assert!(write_atomic(&target, b"x").is_err());
        assert!(!target.exists());
        let p = d.path().join("ok.bin");
        write_atomic(&p, b"abc").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        let leftovers = fs::read_dir(d.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temporary files must be renamed away");
    }
}
