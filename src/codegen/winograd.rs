//! Winograd F(2 × 2, 3 × 3) convolutions: 3 × 3 stride-1 convolutions
//! with 24 or more channels in and out (forward, input gradient and
//! filter gradient) as 16 matrix products of transformed tiles, 16
//! multiplies per 2 × 2 outputs and input channel instead of 36 (Lavin
//! and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! With `d` a 4 × 4 tile of the zero-padded input, `g` a 3 × 3 kernel and
//! `y` the 2 × 2 outputs the tile covers (cross-correlation):
//!
//! ```text
//! y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A
//! Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//! G  = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]
//! Aᵀ = [1 1 1 0; 0 1 -1 -1]
//! ```
//!
//! The steps, each split over threads by a fixed partition (2–4 run once
//! per group of images, [`group_images`]):
//! 1. [`WinoWeights`]: `U[e][o][c] = (G g_oc Gᵀ)[e]` for the 16 positions
//!    `e = 4a + b` (`a` the tile row);
//! 2. [`WinoInput`]: `V[e][c][p] = (Bᵀ d_cp B)[e]` for every tile `p`
//!    (`(n, tile row, tile column)` in row-major order);
//! 3. the matmul kernel: `M[e] = U[e] @ V[e]` (`[m, c] @ [c, p]`, a
//!    batch of 16);
//! 4. [`WinoOutput`]: `y = Aᵀ M A` per tile, then the kernel's
//!    elementwise epilogue (a `conv2d` layer's bias and relu), one store.
//!
//! The filter gradient is the same algorithm transposed (F(3 × 3, 2 × 2)):
//! `dw = Gᵀ [Σ_p (A dy_p Aᵀ) ⊙ (Bᵀ d_p B)] G` over all tiles `p`, with
//! `dy_p` the 2 × 2 of `dy` a tile covers ([`WinoGradDy`], [`WinoGradOut`]).
//!
//! The transforms only add, subtract and halve (exact), and every output
//! sums its terms in a fixed order whatever the partition, so results do
//! not depend on the thread count. They differ from the direct kernel's
//! in rounding: the transformed products carry the tile's other taps and
//! cancel in the output transform. Against the f64 interpreter on random
//! inputs in [-1, 1] (`tests/jit.rs`): forward and input gradient within
//! 1e-5, the filter gradient, a sum over every tile of the batch, within
//! 1e-4 (1e-5 in all but a few cancelling weights).
//!
//! Vectors hold four horizontally adjacent tiles. A plane's tile rows
//! are padded to whole vectors and its last tile row and column may
//! reach past the output ([`Tiling`]): their inputs are the padded
//! copy's zeros, and the output transform stores only what lies inside
//! `y`; the filter gradient reads `dy` from a copy that is zero where the
//! tiles extend past it, so that those positions add nothing.

use super::conv::{epilogue_bases, epilogue_value, fixed_operands, zero_run, NchwEpilogue};
use super::emit::{flags, Kb, Loc};
use super::matmul::store_lanes;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::F32;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;

/// Positions of a transformed tile.
pub const TILE_POSITIONS: usize = 16;

/// Input and output channels from which a 3 × 3 convolution takes the
/// Winograd kernels: with fewer, the 16 products are too thin to win back
/// the transforms' passes. Alternated in one process against the direct
/// kernel (two layers, batch 16, 16 × 16, two threads; forward / training
/// step): 8 channels +22% / +15% (the residual example), 16 +5% / −5%,
/// 24 −13% / −13%, 32 −19% / −24%; at 8 × 8, 24 channels broke even.
const MIN_CHANNELS: usize = 24;

/// How an `oh × ow` output plane is cut into 2 × 2 tiles: `th` tile rows
/// of `tw` tiles (a multiple of 4, one vector per four), read from a
/// zero-padded input plane of `hp × wp`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiling {
    pub th: usize,
    pub tw: usize,
    pub hp: usize,
    pub wp: usize,
}

impl Tiling {
    pub fn of(oh: usize, ow: usize) -> Tiling {
        let th = oh.div_ceil(2);
        let tw = ow.div_ceil(2).next_multiple_of(4);
        Tiling {
            th,
            tw,
            hp: 2 * th + 2,
            wp: 2 * tw + 2,
        }
    }
}

/// Whether a stride-1 convolution (or input gradient) with a `kh × kw`
/// kernel and dilation `dilation`, from `c` to `m` channels, `oh × ow`
/// outputs, runs as Winograd: 3 × 3 undilated kernels, enough channels,
/// and tile rows that padding to whole vectors lengthens by at most a
/// third (ow 28's 14 tiles become 16; ow 10's 5 would become 8 and stay
/// direct).
#[allow(clippy::too_many_arguments)]
pub fn applies(
    kh: usize,
    kw: usize,
    dilation: usize,
    c: usize,
    m: usize,
    oh: usize,
    ow: usize,
) -> bool {
    let tiles = ow.div_ceil(2);
    kh == 3
        && kw == 3
        && dilation == 1
        && c >= MIN_CHANNELS
        && m >= MIN_CHANNELS
        && oh > 0
        && ow > 0
        && 3 * Tiling::of(oh, ow).tw <= 4 * tiles
        && offsets_fit(c, m, Tiling::of(oh, ow))
}

/// Whether the transformed weights and the transformed buffers of one
/// image, whose 16 positions the kernels reach at constant byte offsets,
/// stay within an `i32` offset (a group holds one image, or as many as
/// [`GROUP_BYTES`] allow).
fn offsets_fit(c: usize, m: usize, t: Tiling) -> bool {
    let bytes = 4 * TILE_POSITIONS;
    let one_image = bytes * c.max(m) * row_stride(t.th * t.tw);
    let weights = bytes.saturating_mul(c).saturating_mul(m);
    one_image.max(weights).max(GROUP_BYTES) <= i32::MAX as usize / 2
}

/// Elements between rows of `V` and of `M`: the tile count plus one
/// vector (two where one would make 4 KiB), so that rows are never a
/// multiple of 4 KiB apart (vgg's 4096 and 1024 tiles would be): rows
/// that far apart share L1 sets, and the matmul packs B rows at such
/// strides rather than reading them in place. The extra columns of `V`
/// are zeros.
pub fn row_stride(tiles: usize) -> usize {
    let s = tiles + 4;
    if s.is_multiple_of(1024) {
        s + 4
    } else {
        s
    }
}

/// `U[e][o][c]` from the 3 × 3 kernel of output channel `o` and input
/// channel `c`, whose tap `(a, b)` is at element
/// `off + o·so + c·sc + a·skh + b·skw` of `src` (a forward weight
/// `[m, c, 3, 3]`, or an input gradient's transposed, flipped view).
/// Work units are output channels.
#[derive(Clone, Debug, PartialEq)]
pub struct WinoWeights {
    pub src: Loc,
    pub dst: Loc,
    pub m: usize,
    pub c: usize,
    pub off: i64,
    pub so: i64,
    pub sc: i64,
    pub skh: i64,
    pub skw: i64,
}

/// Column `j` of the first `R` rows of `m`: the second pass of a 2-D
/// transform takes the first pass's results down a column.
fn column<const R: usize, const C: usize>(m: &[[Value; C]], j: usize) -> [Value; R] {
    std::array::from_fn(|i| m[i][j])
}

/// `(G x)` for the three taps of a kernel column or row: the four
/// transformed values.
fn g_transform(k: &mut Kb, x: [Value; 3]) -> [Value; 4] {
    let half = k.fconst(0.5);
    let s = k.b.ins().fadd(x[0], x[2]);
    let p = k.b.ins().fadd(s, x[1]);
    let m = k.b.ins().fsub(s, x[1]);
    [x[0], k.b.ins().fmul(p, half), k.b.ins().fmul(m, half), x[2]]
}

impl WinoWeights {
    pub fn units(&self) -> usize {
        self.m
    }

    pub fn unit_cost(&self) -> usize {
        self.c * 64
    }

    pub fn emit(&self, kb: &mut Kb) {
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let plane = (self.m * self.c * 4) as i64;
        kb.for_range(start, end, 1, |k, o| {
            let so = k.b.ins().imul_imm_s(o, self.so * 4);
            let s0 = k.b.ins().iadd(src, so);
            let s0 = k.b.ins().iadd_imm_s(s0, self.off * 4);
            let d0 = k.addr(dst, o, (self.c * 4) as i64);
            let zero = k.iconst(0);
            let cn = k.iconst(self.c as i64);
            k.for_range(zero, cn, 1, |k, c| {
                let s = k.addr(s0, c, self.sc * 4);
                let g: Vec<Vec<Value>> = (0..3)
                    .map(|a| {
                        (0..3)
                            .map(|b| {
                                let off = (a as i64 * self.skh + b as i64 * self.skw) * 4;
                                k.load_f(s, off as i32)
                            })
                            .collect()
                    })
                    .collect();
                // Rows first (`G g`), then the columns of the result.
                let cols: Vec<[Value; 4]> = (0..3)
                    .map(|b| g_transform(k, [g[0][b], g[1][b], g[2][b]]))
                    .collect();
                let d = k.addr(d0, c, 4);
                for a in 0..4 {
                    let u = g_transform(k, column(&cols, a));
                    for (b, &v) in u.iter().enumerate() {
                        let e = (4 * a + b) as i64;
                        k.store_f(v, d, (e * plane) as i32);
                    }
                }
            });
        });
    }
}

/// `Bᵀ x` over four rows (or the four column kinds of a row) of a tile.
fn b_transform(k: &mut Kb, x: [Value; 4]) -> [Value; 4] {
    [
        k.b.ins().fsub(x[0], x[2]),
        k.b.ins().fadd(x[1], x[2]),
        k.b.ins().fsub(x[2], x[1]),
        k.b.ins().fsub(x[1], x[3]),
    ]
}

/// `V[e][c][p]` from the padded input `xp` (`n · c` planes of `hp × wp`):
/// tile `(i, j)` of a plane is its rows `2i..2i + 4` and columns
/// `2j..2j + 4`. Work units are `(n, c, tile row)`; each runs over its
/// row's tiles four at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct WinoInput {
    pub xp: Loc,
    pub v: Loc,
    pub n: usize,
    pub c: usize,
    pub hp: usize,
    pub wp: usize,
    /// Tile rows and columns of a plane.
    pub th: usize,
    pub tw: usize,
    /// Elements between rows of `V` ([`row_stride`]).
    pub pp: usize,
}

impl WinoInput {
    pub fn units(&self) -> usize {
        self.n * self.c * self.th
    }

    pub fn unit_cost(&self) -> usize {
        self.tw * 20
    }

    fn tiles(&self) -> usize {
        self.n * self.th * self.tw
    }

    pub fn emit(&self, kb: &mut Kb) {
        let xp = kb.base(self.xp);
        let v = kb.base(self.v);
        let (start, end) = (kb.start, kb.end);
        let s = self.clone();
        let eplane = (s.c * s.pp * 4) as i64;
        kb.for_range(start, end, 1, |k, u| {
            let (pl, i) = k.udiv_rem_const(u, s.th as u64, true);
            let (n, c) = k.udiv_rem_const(pl, s.c as u64, true);
            let src = k.addr(xp, pl, (s.hp * s.wp * 4) as i64);
            let src = k.addr(src, i, (2 * s.wp * 4) as i64);
            // The unit's first tile.
            let p0 = k.b.ins().imul_imm_s(n, s.th as i64);
            let p0 = k.b.ins().iadd(p0, i);
            let p0 = k.b.ins().imul_imm_s(p0, s.tw as i64);
            let dst = k.addr(v, c, (s.pp * 4) as i64);
            let dst = k.addr(dst, p0, 4);
            k.for_const(0, s.tw / 4, |k, q| {
                let sq = k.addr(src, q, 32);
                let dq = k.addr(dst, q, 16);
                // Per tile row r, the four column kinds of four tiles:
                // columns 2j, 2j + 1, 2j + 2, 2j + 3 of tiles j..j + 4.
                let kinds: Vec<[Value; 4]> = (0..4)
                    .map(|r| {
                        let row = (r * s.wp * 4) as i32;
                        let lo = k.load_v(sq, row);
                        let hi = k.load_v(sq, row + 16);
                        let lo2 = k.load_v(sq, row + 8);
                        let hi2 = k.load_v(sq, row + 24);
                        [
                            k.shuffle32(lo, hi, [0, 2, 4, 6]),
                            k.shuffle32(lo, hi, [1, 3, 5, 7]),
                            k.shuffle32(lo2, hi2, [0, 2, 4, 6]),
                            k.shuffle32(lo2, hi2, [1, 3, 5, 7]),
                        ]
                    })
                    .collect();
                // Down the rows (`Bᵀ d`), then along each result row.
                let cols: Vec<[Value; 4]> = (0..4)
                    .map(|kind| {
                        b_transform(
                            k,
                            [
                                kinds[0][kind],
                                kinds[1][kind],
                                kinds[2][kind],
                                kinds[3][kind],
                            ],
                        )
                    })
                    .collect();
                for a in 0..4 {
                    let t = b_transform(k, column(&cols, a));
                    for (b, &x) in t.iter().enumerate() {
                        let e = (4 * a + b) as i64;
                        k.b.ins().store(flags(), x, dq, (e * eplane) as i32);
                    }
                }
            });
            // The unit holding the last tiles also zeroes the padding
            // columns of its channel's rows.
            let last = k.b.ins().iadd_imm_s(p0, s.tw as i64);
            let is_last = k.b.ins().icmp_imm_s(IntCC::Equal, last, s.tiles() as i64);
            k.if_then(is_last, |k| {
                for e in 0..TILE_POSITIONS as i64 {
                    let tail = k.b.ins().iadd_imm_s(dst, e * eplane + (s.tw * 4) as i64);
                    zero_run(k, tail, s.pp - s.tiles());
                }
            });
        });
    }
}

/// `y [n, m, oh, ow]` from `M[e][o][p]`: per tile `Aᵀ M A`, then the
/// epilogue. Work units are `(n, o, tile row)`, four tiles at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct WinoOutput {
    pub mm: Loc,
    pub y: Loc,
    /// The first image of `y` this step writes, and how many.
    pub n0: usize,
    pub n: usize,
    pub m: usize,
    pub oh: usize,
    pub ow: usize,
    pub th: usize,
    pub tw: usize,
    pub pp: usize,
    pub epilogue: Option<NchwEpilogue>,
}

/// `Aᵀ x` for four values along a tile row or column: the two outputs.
fn a_transform(k: &mut Kb, x: [Value; 4]) -> [Value; 2] {
    let s = k.b.ins().fadd(x[0], x[1]);
    let d = k.b.ins().fsub(x[1], x[2]);
    [k.b.ins().fadd(s, x[2]), k.b.ins().fsub(d, x[3])]
}

impl WinoOutput {
    pub fn units(&self) -> usize {
        self.n * self.m * self.th
    }

    pub fn unit_cost(&self) -> usize {
        self.tw * 20
    }

    pub fn emit(&self, kb: &mut Kb) {
        let mm = kb.base(self.mm);
        let y = kb.base(self.y);
        let (start, end) = (kb.start, kb.end);
        let s = self.clone();
        let eplane = (s.m * s.pp * 4) as i64;
        let ep_bases = s
            .epilogue
            .as_ref()
            .map(|ep| epilogue_bases(kb, ep, y))
            .unwrap_or_default();
        kb.for_range(start, end, 1, |k, u| {
            let (pl, i) = k.udiv_rem_const(u, s.th as u64, true);
            let (n, o) = k.udiv_rem_const(pl, s.m as u64, true);
            let p0 = k.b.ins().imul_imm_s(n, s.th as i64);
            let p0 = k.b.ins().iadd(p0, i);
            let p0 = k.b.ins().imul_imm_s(p0, s.tw as i64);
            let src = k.addr(mm, o, (s.pp * 4) as i64);
            let src = k.addr(src, p0, 4);
            let plane = k.b.ins().iadd_imm_s(pl, (s.n0 * s.m) as i64);
            let row0 = k.addr(y, plane, (s.oh * s.ow * 4) as i64);
            let row0 = k.addr(row0, i, (2 * s.ow * 4) as i64);
            let fixed = s
                .epilogue
                .as_ref()
                .map(|ep| fixed_operands(k, ep, &ep_bases, o));
            // Groups of four tiles whose eight columns all lie in `y`,
            // then the group the right edge cuts, if any.
            let group = |k: &mut Kb, q: Value, cols: usize| {
                let sq = k.addr(src, q, 16);
                let yq = k.addr(row0, q, 32);
                let m: Vec<Value> = (0..TILE_POSITIONS as i64)
                    .map(|e| k.load_v(sq, (e * eplane) as i32))
                    .collect();
                // Along each row (`M A`), then down the two columns.
                let rows: Vec<[Value; 2]> = (0..4)
                    .map(|a| a_transform(k, [m[4 * a], m[4 * a + 1], m[4 * a + 2], m[4 * a + 3]]))
                    .collect();
                let col0 = a_transform(k, column(&rows, 0));
                let col1 = a_transform(k, column(&rows, 1));
                // Output row r of the four tiles: their even columns in
                // `col0[r]`, odd ones in `col1[r]`, interleaved.
                let out_row = |k: &mut Kb, r: usize| {
                    let lo = k.shuffle32(col0[r], col1[r], [0, 4, 1, 5]);
                    let hi = k.shuffle32(col0[r], col1[r], [2, 6, 3, 7]);
                    for (h, mut val) in [lo, hi].into_iter().enumerate() {
                        let lanes = cols.saturating_sub(4 * h).min(4);
                        if lanes == 0 {
                            continue;
                        }
                        let off = (r * s.ow * 4 + h * 16) as i32;
                        if let (Some(ep), Some(fixed)) = (s.epilogue.as_ref(), fixed.as_ref()) {
                            let at = k.b.ins().isub(yq, y);
                            val = epilogue_value(k, (ep, &ep_bases, fixed), val, (at, off, lanes));
                        }
                        store_lanes(k, val, yq, off, lanes);
                    }
                };
                out_row(k, 0);
                if s.oh.is_multiple_of(2) {
                    out_row(k, 1);
                } else {
                    // The last tile row's second row lies below `y`.
                    let inside =
                        k.b.ins()
                            .icmp_imm_s(IntCC::SignedLessThan, i, (s.th - 1) as i64);
                    k.if_then(inside, |k| out_row(k, 1));
                }
            };
            let full = s.ow / 8;
            if full > 0 {
                k.for_const(0, full, |k, q| group(k, q, 8));
            }
            if !s.ow.is_multiple_of(8) {
                let q = k.iconst(full as i64);
                group(k, q, s.ow % 8);
            }
        });
    }
}

/// `Sᵀ[e][p][o] = (A g Aᵀ)[e]` for the 2 × 2 tile `g` of `dy` that tile
/// `p` covers, read from `dy` transposed to `[n, 2·th, wd, m]` (`dyt`,
/// zeros where it extends past `dy`), four
/// output channels per vector: the filter gradient's 16 products then
/// reduce over tiles with `Sᵀ[e]` as a plain row-major B operand.
/// `A = [1 0; 1 1; 1 -1; 0 -1]` (F(3, 2), the transpose of the forward
/// algorithm). Rows `p` past the last tile are zeros. Work units are
/// `(n, tile row)`.
#[derive(Clone, Debug, PartialEq)]
pub struct WinoGradDy {
    pub dyt: Loc,
    pub st: Loc,
    pub n: usize,
    pub m: usize,
    /// Pixels per row of `dyt`: two per tile.
    pub wd: usize,
    pub th: usize,
    pub tw: usize,
    pub pp: usize,
}

/// `A x` for the two values of a tile row or column: the four transformed.
fn a_expand(k: &mut Kb, x: [Value; 2]) -> [Value; 4] {
    [
        x[0],
        k.b.ins().fadd(x[0], x[1]),
        k.b.ins().fsub(x[0], x[1]),
        k.b.ins().fneg(x[1]),
    ]
}

impl WinoGradDy {
    pub fn units(&self) -> usize {
        self.n * self.th
    }

    pub fn unit_cost(&self) -> usize {
        self.tw * self.m * 12
    }

    pub fn emit(&self, kb: &mut Kb) {
        let dyt = kb.base(self.dyt);
        let st = kb.base(self.st);
        let (start, end) = (kb.start, kb.end);
        let s = self.clone();
        let m = s.m;
        let eplane = (s.pp * m * 4) as i64;
        let pix = (m * 4) as i64;
        let tiles = s.n * s.th * s.tw;
        kb.for_range(start, end, 1, |k, u| {
            // Unit `u` is image row pair `u`: tiles `u·tw..`, dy rows 2u, 2u + 1.
            let src = k.addr(dyt, u, 2 * (s.wd as i64) * pix);
            let p0 = k.b.ins().imul_imm_s(u, s.tw as i64);
            let dst = k.addr(st, p0, pix);
            k.for_const(0, s.tw, |k, j| {
                let sj = k.addr(src, j, 2 * pix);
                let dj = k.addr(dst, j, pix);
                for o in (0..m).step_by(4) {
                    let lanes = (m - o).min(4);
                    let off = (o * 4) as i32;
                    let g = |k: &mut Kb, r: usize, c: usize| {
                        let at = off + (r as i64 * s.wd as i64 * pix + c as i64 * pix) as i32;
                        k.load_lanes(sj, at, lanes)
                    };
                    let rows: Vec<[Value; 4]> = (0..2)
                        .map(|r| {
                            let (a, b) = (g(k, r, 0), g(k, r, 1));
                            a_expand(k, [a, b])
                        })
                        .collect();
                    for b in 0..4 {
                        let col = a_expand(k, column(&rows, b));
                        for (a, &v) in col.iter().enumerate() {
                            let e = (4 * a + b) as i64;
                            store_lanes(k, v, dj, (e * eplane) as i32 + off, lanes);
                        }
                    }
                }
            });
            // The unit holding the last tiles zeroes the padding rows.
            let last = k.b.ins().iadd_imm_s(p0, s.tw as i64);
            let is_last = k.b.ins().icmp_imm_s(IntCC::Equal, last, tiles as i64);
            k.if_then(is_last, |k| {
                for e in 0..TILE_POSITIONS as i64 {
                    let tail = k.b.ins().iadd_imm_s(dst, e * eplane + s.tw as i64 * pix);
                    zero_run(k, tail, (s.pp - tiles) * m);
                }
            });
        });
    }
}

/// The filter gradient `dw [m, c, 3, 3]` from the 16 products of each
/// group of images, `DW[g][e][c][o] = Σ_p V[e][c][p] · Sᵀ[e][p][o]`:
/// `dw_oc = Gᵀ (Σ_g DW[g]_oc) G`, the groups summed in order, with
/// `Gᵀ = [1 ½ ½ 0; 0 ½ -½ 0; 0 ½ ½ 1]`. Work units are output channels.
#[derive(Clone, Debug, PartialEq)]
pub struct WinoGradOut {
    pub dw_t: Loc,
    pub dw: Loc,
    pub m: usize,
    pub c: usize,
    pub groups: usize,
}

/// `Gᵀ x` for four values: the three kernel taps.
fn g_reduce(k: &mut Kb, x: [Value; 4]) -> [Value; 3] {
    let half = k.fconst(0.5);
    let s = k.b.ins().fadd(x[1], x[2]);
    let d = k.b.ins().fsub(x[1], x[2]);
    let hs = k.b.ins().fmul(s, half);
    [
        k.b.ins().fadd(x[0], hs),
        k.b.ins().fmul(d, half),
        k.b.ins().fadd(hs, x[3]),
    ]
}

impl WinoGradOut {
    pub fn units(&self) -> usize {
        self.m
    }

    pub fn unit_cost(&self) -> usize {
        self.c * (32 + 16 * self.groups)
    }

    pub fn emit(&self, kb: &mut Kb) {
        let src = kb.base(self.dw_t);
        let dst = kb.base(self.dw);
        let (start, end) = (kb.start, kb.end);
        let (m, c) = (self.m, self.c);
        let eplane = (c * m * 4) as i64;
        kb.for_range(start, end, 1, |k, o| {
            let s0 = k.addr(src, o, 4);
            let d0 = k.addr(dst, o, (c * 9 * 4) as i64);
            let zero = k.iconst(0);
            let cn = k.iconst(c as i64);
            k.for_range(zero, cn, 1, |k, ci| {
                let s = k.addr(s0, ci, (m * 4) as i64);
                // The first group's products, plus the others' in order.
                let sums: Vec<Variable> = (0..TILE_POSITIONS as i64)
                    .map(|e| {
                        let x = k.load_f(s, (e * eplane) as i32);
                        k.var(F32, x)
                    })
                    .collect();
                if self.groups > 1 {
                    k.for_const(1, self.groups, |k, g| {
                        let sg = k.addr(s, g, TILE_POSITIONS as i64 * eplane);
                        for (e, &sum) in sums.iter().enumerate() {
                            let y = k.load_f(sg, (e as i64 * eplane) as i32);
                            let x = k.b.use_var(sum);
                            let x = k.b.ins().fadd(x, y);
                            k.b.def_var(sum, x);
                        }
                    });
                }
                let x: Vec<Value> = sums.iter().map(|&v| k.b.use_var(v)).collect();
                // Along each row, then down the three columns.
                let rows: Vec<[Value; 3]> = (0..4)
                    .map(|a| g_reduce(k, [x[4 * a], x[4 * a + 1], x[4 * a + 2], x[4 * a + 3]]))
                    .collect();
                let d = k.addr(d0, ci, 9 * 4);
                for b in 0..3 {
                    let col = g_reduce(k, column(&rows, b));
                    for (a, &v) in col.iter().enumerate() {
                        k.store_f(v, d, ((3 * a + b) * 4) as i32);
                    }
                }
            });
        });
    }
}

/// Bytes of `V` and `M` (or, for the filter gradient, `V` and `Sᵀ`) for
/// one group of images: the steps run a group at a time through the same
/// buffers, so their scratch does not grow with the batch (vgg's second
/// layer needed 17 MB for 16 images, a batch of 128 would need 136).
/// Groups small enough to stay in L2 between the steps were not faster:
/// on vgg's forward, alternated in one process, 2 MiB groups took 5%
/// longer than one group for the whole batch, 8 and 16 MiB the same.
const GROUP_BYTES: usize = 8 << 20;

/// Images per group (see [`GROUP_BYTES`]), at least one.
pub fn group_images(n: usize, c: usize, m: usize, t: Tiling) -> usize {
    let per_image = 4 * TILE_POSITIONS * (c + m) * t.th * t.tw;
    (GROUP_BYTES / per_image.max(1)).clamp(1, n.max(1))
}

/// Bytes of the Winograd buffers `U`, `V` and `M`.
pub fn buffer_bytes(m: usize, c: usize, tiles: usize) -> (usize, usize, usize) {
    let pp = row_stride(tiles);
    let f = 4 * TILE_POSITIONS;
    (f * m * c, f * c * pp, f * m * pp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winograd_takes_wide_3x3_layers_whose_tiles_fill_whole_vectors() {
        // vgg's layers after the first: 32 → 32 at 32 × 32, 32 → 64 and
        // 64 → 64 at 16 × 16.
        assert!(applies(3, 3, 1, 32, 32, 32, 32));
        assert!(applies(3, 3, 1, 32, 64, 16, 16));
        assert!(applies(3, 3, 1, 64, 64, 16, 16));
        // vgg's first layer has 3 input channels; lenet's kernels are 5 × 5.
        assert!(!applies(3, 3, 1, 3, 32, 32, 32));
        assert!(!applies(5, 5, 1, 6, 16, 10, 10));
        // Dilated; empty; too few channels (the residual example's 8, 16).
        assert!(!applies(3, 3, 2, 32, 32, 16, 16));
        assert!(!applies(3, 3, 1, 32, 24, 0, 16));
        assert!(!applies(3, 3, 1, 8, 8, 16, 16));
        assert!(!applies(3, 3, 1, 16, 32, 16, 16));
        // Odd heights and widths whose tile rows pad to whole vectors by
        // at most a third (28 columns: 14 tiles in 16; 13: 7 in 8; 6: 3
        // in 4), not those that would pad more (10 columns: 5 in 8; 2).
        assert!(applies(3, 3, 1, 24, 24, 15, 28));
        assert!(applies(3, 3, 1, 24, 24, 7, 13));
        assert!(applies(3, 3, 1, 24, 24, 7, 6));
        assert!(!applies(3, 3, 1, 24, 24, 16, 10));
        assert!(!applies(3, 3, 1, 24, 24, 16, 2));
        // Transformed images or weights too large for the kernels'
        // constant offsets.
        assert!(applies(3, 3, 1, 512, 512, 224, 224));
        assert!(!applies(3, 3, 1, 2048, 2048, 224, 224));
        assert!(!applies(3, 3, 1, 4096, 4096, 2, 8));
        assert_eq!(
            Tiling::of(15, 28),
            Tiling {
                th: 8,
                tw: 16,
                hp: 18,
                wp: 34
            }
        );
    }

    #[test]
    fn groups_of_images_keep_v_and_m_within_their_budget() {
        // vgg's second layer: 1 MiB of V and M per image; its fourth:
        // 512 KiB, so the whole batch of 16 in one group.
        assert_eq!(group_images(16, 32, 32, Tiling::of(32, 32)), 8);
        assert_eq!(group_images(16, 64, 64, Tiling::of(16, 16)), 16);
        // An image over the budget still makes a group of one.
        assert_eq!(group_images(3, 512, 512, Tiling::of(64, 64)), 1);
        assert_eq!(group_images(1, 8, 8, Tiling::of(2, 8)), 1);
    }

    #[test]
    fn transformed_rows_are_never_a_multiple_of_4_kib_apart() {
        for tiles in [4, 256, 1024, 4096, 1020, 16384] {
            let stride = row_stride(tiles) * 4;
            assert!(!stride.is_multiple_of(4096), "{tiles} tiles");
            assert!(row_stride(tiles) >= tiles && row_stride(tiles).is_multiple_of(4));
        }
    }
}
