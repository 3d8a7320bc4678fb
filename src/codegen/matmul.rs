//! Batched matmul: a register-tiled `mr × nr` micro-kernel (nr = four
//! floats per f32x4 column) runs over KC-deep blocks of B packed into
//! column panels (`K × nr`, zero-padded at the right edge). A is read in
//! place when its rows are contiguous, else packed into row panels first.
//!
//! Cache blocking: a KC × (NCP·nr) block of packed B (256 KiB) stays in L2
//! while every row panel of a work chunk keeps its `mr × KC` sliver of A in
//! L1. A work unit is one row panel of the output across one chunk of
//! column panels (narrower chunks where there are few row panels, so that
//! threads get equal shares); each output element is accumulated in the
//! same k order whatever the chunking, so results do not depend on the
//! thread count.

use super::emit::{flags, ro_flags, step_order, Kb, Loc};
use super::kernel::{eval_program, EwInstr, MatmulPhase};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;
use std::sync::OnceLock;

/// Shape of the register tile and of the cache blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Rows of the register tile.
    pub mr: usize,
    /// f32x4 columns of the register tile.
    pub nv: usize,
    /// k steps per iteration of the inner loop.
    pub unroll: usize,
    /// Depth of a k block.
    pub kc: usize,
    /// Column panels per L2 block of packed B.
    pub ncp: usize,
}

impl Tile {
    pub fn nr(&self) -> usize {
        4 * self.nv
    }
}

/// k rows of B per packing work unit: short enough that the source lines
/// a unit reads stay in L1 while it writes every column panel.
const PACK_KB: usize = 32;

/// Row panels up to which contiguous B is read in place. The loop runs as
/// fast over B rows in place as over packed panels (measured with B in L1,
/// L2 and at 1 KiB row strides), so packing only pays where many row
/// panels amortise its pass over memory; mlp's 64-row products no longer
/// copy their 784 × 256 weight each call.
const B_DIRECT_MAX_PANELS: usize = 16;

/// Column panels from which A is packed with every element stored as a
/// broadcast f32x4. The micro-kernel then loads each row's multiplier with
/// a plain vector load instead of a scalar load and a shuffle: Cranelift
/// cannot fold a broadcast that feeds two FMAs into `vbroadcastss mem`,
/// and the shuffle competes with the FMAs for the vector ports. Measured
/// in an asm loop over data in L1 and L2 on this machine's core: 30–32
/// GFLOP/s against 24–27 with the shuffle in its slow phases, equal in its
/// fast ones. Packing writes four copies of A, so it pays only where many
/// column panels reuse each packed row panel: the transformer's
/// `[512, 1000] @ [1000, 64]` gradient (8 panels) took 1.5× as long.
const A_BROADCAST_MIN_PANELS: usize = 16;

/// Bytes up to which contiguous B is read in place however many row
/// panels reuse it: it stays in L1/L2 across them, and packing it would
/// cost a pass and a parallel step of its own (the transformer's
/// `[64, 64]` and `[64, 256]` weights against 512-row activations).
const B_DIRECT_MAX_BYTES: usize = 64 << 10;

/// Compute units a product is cut into at least (where it has enough
/// column panels), so that two or three threads finish close together.
const MIN_COMPUTE_UNITS: usize = 32;

/// 5 × 8 keeps 10 accumulators, 2 B vectors, a broadcast and its copy in
/// the 16 xmm registers (spills start beyond 13 accumulators). k is
/// unrolled four times: an even count lets the register rotation of
/// `micro_kernel` close on itself, and four rather than two halves the
/// loop's counter and pointer updates (512³ 6.0 -> 5.5 ms on two threads,
/// 10.9 -> 10.0 on one, alternated; eight was no better overall).
const TILE: Tile = Tile {
    mr: 5,
    nv: 2,
    unroll: 4,
    kc: 256,
    ncp: 32,
};

/// One matmul operand: element `(batch…, i, j)` is at
/// `off + Σ batch_d · batch_strides_d + i·rs + j·cs` (elements).
#[derive(Clone, Debug, PartialEq)]
pub struct MmOperand {
    pub loc: Loc,
    pub off: usize,
    /// Per output batch dim; 0 where the operand is broadcast.
    pub batch_strides: Vec<i64>,
    pub rs: i64,
    pub cs: i64,
}

/// `C[batch] = A[batch] @ B[batch]`, C contiguous `[batch…, m, n]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matmul {
    pub batch: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a: MmOperand,
    pub b: MmOperand,
    pub c: Loc,
    pub c_off: usize,
    /// Scratch for the packed panels (see `pack_a_bytes`/`pack_b_bytes`).
    pub pack_a: Loc,
    pub pack_b: Loc,
    /// Whether the model runs its steps on more than one thread. Then A
    /// packed as broadcasts is packed by each work unit for itself (see
    /// [`Matmul::a_in_unit`]).
    pub split: bool,
    /// Elementwise ops applied to every tile after the last k block,
    /// before its one store (a dense layer's bias and activation, a
    /// gradient's optimizer update): C is written once, and each value
    /// rounds as in the separate elementwise kernel.
    pub epilogue: Option<Epilogue>,
}

/// An elementwise program over the product and other operands, indexed
/// like C.
#[derive(Clone, Debug, PartialEq)]
pub struct Epilogue {
    pub prog: Vec<EwInstr>,
    pub ins: Vec<EpilogueInput>,
    /// A second program over the first one's result, stored to a buffer
    /// of its own (an optimizer's `w − lr·v` after its momentum `v`), so
    /// that the result is not read back by a kernel of its own.
    pub then: Option<Box<Follow>>,
}

/// The second program of an [`Epilogue`]: its `Product` operand is the
/// first program's result; `out` is contiguous, shaped like C.
#[derive(Clone, Debug, PartialEq)]
pub struct Follow {
    pub prog: Vec<EwInstr>,
    pub ins: Vec<EpilogueInput>,
    pub out: Loc,
}

/// How an epilogue operand is indexed at C's element `(batch…, i, j)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EpilogueInput {
    /// The matmul's result itself.
    Product,
    /// A contiguous tensor of C's shape, at the same index.
    Full(Loc),
    /// A `[n]` vector, at `j` (a bias).
    Row(Loc),
    /// One value for every element.
    Scalar(Loc),
}

fn pack_dims(batch: &[usize], strides: &[i64]) -> Vec<usize> {
    batch
        .iter()
        .zip(strides)
        .map(|(&d, &s)| if s == 0 { 1 } else { d })
        .collect()
}

/// Strides (in packed-batch units) to find an operand's packed batch from an
/// output batch index; 0 along broadcast dims.
fn pack_index_strides(batch: &[usize], strides: &[i64]) -> Vec<i64> {
    let pd = pack_dims(batch, strides);
    let mut cs = super::kernel::contiguous_strides(&pd);
    for (d, s) in cs.iter_mut().enumerate() {
        if strides[d] == 0 {
            *s = 0;
        }
    }
    cs
}

/// Where the micro-kernel reads A: row `r`, step `kk` of the tile is at
/// `ptr + r·row_bytes + kk·k_bytes`.
#[derive(Clone, Copy)]
struct ASrc {
    ptr: Value,
    row_bytes: i64,
    k_bytes: i64,
    /// Each element is stored four times, as the f32x4 the FMAs take.
    broadcast: bool,
    /// Packed by this function (into its stack), so not read-only to it.
    packed_here: bool,
}

/// Pack rows `0..rows` of the A sliver at `src` (row stride `rs`, k stride
/// `cs`, in elements), k steps `0..kc`, into `buf` as broadcasts, `mr`
/// vectors per k step (the layout `emit_pack_a` writes for one panel).
fn pack_sliver(
    k: &mut Kb,
    (src, rs, cs): (Value, i64, i64),
    buf: Value,
    (rows, mr): (usize, usize),
    kc: Value,
) {
    let zero = k.iconst(0);
    let row_ptrs: Vec<Value> = (0..rows)
        .map(|r| k.b.ins().iadd_imm_s(src, r as i64 * rs * 4))
        .collect();
    k.for_range(zero, kc, 1, |k, kk| {
        let d = k.addr(buf, kk, (mr * 16) as i64);
        for (r, &p) in row_ptrs.iter().enumerate() {
            let s = k.addr(p, kk, cs * 4);
            let x = k.load_f(s, 0);
            let v = k.b.ins().splat(F32X4, x);
            k.b.ins().store(flags(), v, d, (r * 16) as i32);
        }
    });
}

/// Blocks for products large in all three dimensions (see
/// `Matmul::is_large`): k blocks of up to 1024 (one block for gemm's 512³
/// and 1024³) and B blocks of 128 column panels (narrower on cores with a
/// large L2, see [`Matmul::large_tile`]). The `mr × KC` sliver of A
/// (up to 80 KiB as broadcasts) then lives in L2 rather than L1, but C is
/// loaded and stored once or twice instead of four or eight times, and
/// each sliver, fetched from memory once per column chunk, serves four
/// times as many tiles. Alternated in one process (medians of 12–25
/// rounds, 2 threads): 512³ −4 to −7%, 1024³ −8% with k blocks of 512 and
/// 64 panels, and a further −2 to −5% on 1024³ with these; mlp's 64-row
/// layers, which do not qualify, were 8% slower with such blocks.
const LARGE_TILE: Tile = Tile {
    kc: 1024,
    ncp: 128,
    ..TILE
};
/// FLOPs below which a product's loops take two k steps per iteration
/// rather than four: they run for a few microseconds, and the shorter
/// loop body cuts their compile time (lenet's training step: its matmul
/// kernels 5912 -> 5614 Cranelift instructions) at no measured cost
/// (lenet's and mlp's training steps alternated in one process: within
/// 1%).
const SMALL_MAX_FLOPS: usize = 1 << 21;

/// Row and column panels, and k, from which a product takes `LARGE_TILE`.
const LARGE_MIN_PANELS: usize = 64;
const LARGE_MIN_K: usize = 256;

/// L2 size from which a large product's B block is cut to fit half of it.
/// Measured on two machines (gemm 1024³, alternated in one process): on a
/// Xeon core with 2 MiB of L2, 32-panel blocks (1 MiB) ran 5–10% faster
/// on two threads than 128-panel ones (4 MiB, streamed from L3 by both
/// cores; `768 × 2048 × 1536` 7–9%), equal on one thread; 512³, whose
/// whole B is 1 MiB, keeps one block. On a Zen 4 core with 1 MiB of L2,
/// 32- and 64-panel blocks were no faster.
const L2_FITTED_MIN: usize = 2 << 20;

/// Bytes of the calling core's L2 cache, read once (Linux sysfs; None where
/// it cannot be read).
fn host_l2_bytes() -> Option<usize> {
    static L2: OnceLock<Option<usize>> = OnceLock::new();
    *L2.get_or_init(|| {
        let size =
            std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index2/size").ok()?;
        cache_bytes(&size)
    })
}

/// A sysfs cache size (`2048K`, `1M`, `512`) in bytes.
fn cache_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = match s.strip_suffix('K') {
        Some(d) => (d, 1 << 10),
        None => match s.strip_suffix('M') {
            Some(d) => (d, 1 << 20),
            None => (s, 1),
        },
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

impl Matmul {
    /// With A packed as broadcasts, a k block is half as deep, so that
    /// the `mr × KC` sliver of A (four times larger) and the B rows a tile
    /// reads still fit L1 together; large products take
    /// [`Matmul::large_tile`].
    pub fn tile(&self) -> Tile {
        let t = if self.is_large() {
            self.large_tile(host_l2_bytes())
        } else if self.a_broadcast() {
            Tile {
                kc: TILE.kc / 2,
                ..TILE
            }
        } else {
            TILE
        };
        if self.flops() < SMALL_MAX_FLOPS {
            Tile { unroll: 2, ..t }
        } else {
            t
        }
    }

    /// [`LARGE_TILE`], with B blocks cut to half of an L2 of at least
    /// [`L2_FITTED_MIN`] bytes (a multiple of 4 panels, at least 16). The
    /// block width decides which units share a block, not the order in
    /// which an element sums its k terms, so results do not depend on it.
    fn large_tile(&self, l2: Option<usize>) -> Tile {
        let l = LARGE_TILE;
        match l2 {
            Some(l2) if l2 >= L2_FITTED_MIN => {
                let panel_bytes = self.k.min(l.kc) * l.nr() * 4;
                let ncp = (l2 / 2 / panel_bytes.max(1)) / 4 * 4;
                Tile {
                    ncp: ncp.clamp(16, l.ncp),
                    ..l
                }
            }
            _ => l,
        }
    }

    fn flops(&self) -> usize {
        2 * self.out_batches() * self.m * self.n * self.k
    }

    /// At least 64 row panels and 64 column panels, and a k deep enough
    /// that blocking it matters (gemm's 512³ and 1024³; the workloads'
    /// products all have a side of 64 or fewer).
    fn is_large(&self) -> bool {
        self.k >= LARGE_MIN_K
            && self.m.div_ceil(TILE.mr) >= LARGE_MIN_PANELS
            && self.n.div_ceil(TILE.nr()) >= LARGE_MIN_PANELS
    }

    /// A is read in place when its rows are contiguous and every offset the
    /// micro-kernel adds to a row pointer fits an instruction's immediate.
    fn a_direct(&self) -> bool {
        let t = self.tile();
        let span = (t.mr as i64) * self.a.rs.abs() * 4 + (t.unroll as i64) * 4;
        self.a.cs == 1 && span < i32::MAX as i64 && !self.a_broadcast()
    }
    /// Each compute unit packs its own `mr × KC` sliver of A, as
    /// broadcasts, into a stack buffer before its tiles, instead of a
    /// packing phase writing all of A to the arena first (four times A's
    /// size as broadcasts: 16 MiB for 1024³) for the tiles to read back
    /// from memory. Large products only: their units span so many column
    /// panels that packing a sliver costs under 1% of the unit's FMAs.
    /// Alternated in one process: 512³ −7% on two threads and −11% on
    /// one, 1024³ −4.5%.
    ///
    /// On several threads, every product whose A is packed as broadcasts
    /// does the same, unless batches share one A (a convolution's weight,
    /// which a packing phase packs once for all of them): a packing phase
    /// would write A from both cores and each unit read its sliver back
    /// from wherever it landed. On one thread the phase packs each sliver
    /// once for all column chunks, which per-unit packing would repeat
    /// (mlp's 64-row products have three). Alternated in one process on
    /// two threads: mlp forward −5 to −9%, gru's training step −4%, the
    /// transformer −2%, lenet, lstm and vgg within noise (vgg's training
    /// step was +8% with the batch-shared A packed per unit too).
    fn a_in_unit(&self) -> bool {
        let own_a = self.a_batches() == self.out_batches();
        self.is_large() || (self.split && self.a_broadcast() && own_a)
    }
    /// The tiles find A through its own tensor (read in place, or packed
    /// per unit from there), so no packing phase writes it to the arena.
    fn a_from_source(&self) -> bool {
        self.a_direct() || self.a_in_unit()
    }
    /// A is packed as broadcast vectors (see A_BROADCAST_MIN_PANELS).
    fn a_broadcast(&self) -> bool {
        self.n.div_ceil(TILE.nr()) >= A_BROADCAST_MIN_PANELS
    }
    /// Bytes of one element of packed A.
    fn a_elem_bytes(&self) -> usize {
        if self.a_broadcast() {
            16
        } else {
            4
        }
    }
    /// B is read in place when its rows are contiguous and few row panels
    /// reuse it or it is small (see B_DIRECT_MAX_PANELS and
    /// B_DIRECT_MAX_BYTES).
    /// Row strides that are multiples of 4 KiB are packed anyway, since
    /// rows that far apart compete for the same L1 sets.
    fn b_direct(&self) -> bool {
        let t = self.tile();
        let row = self.b.rs * 4;
        let reach = (panels_per_tile(1, t.nv) * t.nr() * 4) as i64 + row.abs() * t.unroll as i64;
        let small = self.k * self.n * 4 <= B_DIRECT_MAX_BYTES;
        self.b.cs == 1
            && (self.mp() <= B_DIRECT_MAX_PANELS || small)
            && row % 4096 != 0
            && reach < i32::MAX as i64
    }
    /// Column panels per compute unit: the L2 block width, narrowed when
    /// the product has few row panels so that there are enough units to
    /// share among threads (a 64-row product has 13 row panels, which two
    /// threads would split 7:6). A multiple of 4, so the tiles of edge
    /// rows, which span up to 4 panels, stay whole.
    fn chunk_panels(&self) -> usize {
        let t = self.tile();
        let row_units = self.out_batches() * self.mp();
        let want_chunks = MIN_COMPUTE_UNITS.div_ceil(row_units);
        self.np()
            .div_ceil(want_chunks)
            .next_multiple_of(4)
            .clamp(4, t.ncp)
    }
    fn col_chunks(&self) -> usize {
        self.np().div_ceil(self.chunk_panels())
    }
    fn mp(&self) -> usize {
        self.m.div_ceil(self.tile().mr)
    }
    fn np(&self) -> usize {
        self.n.div_ceil(self.tile().nr())
    }
    fn nkp(&self) -> usize {
        self.k.div_ceil(PACK_KB)
    }
    fn a_batches(&self) -> usize {
        pack_dims(&self.batch, &self.a.batch_strides)
            .iter()
            .product()
    }
    fn b_batches(&self) -> usize {
        pack_dims(&self.batch, &self.b.batch_strides)
            .iter()
            .product()
    }
    fn out_batches(&self) -> usize {
        self.batch.iter().product()
    }

    pub fn pack_a_bytes(&self) -> usize {
        if self.a_from_source() {
            return 0;
        }
        self.a_batches() * self.mp() * self.k * self.tile().mr * self.a_elem_bytes()
    }
    pub fn pack_b_bytes(&self) -> usize {
        if self.b_direct() {
            return 0;
        }
        self.b_batches() * self.np() * self.k * self.tile().nr() * 4
    }

    pub fn units(&self, p: MatmulPhase) -> usize {
        match p {
            MatmulPhase::PackA if self.a_from_source() => 0,
            MatmulPhase::PackA => self.a_batches() * self.mp(),
            MatmulPhase::PackB if self.b_direct() => 0,
            MatmulPhase::PackB => self.b_batches() * self.nkp(),
            MatmulPhase::Compute => self.out_batches() * self.col_chunks() * self.mp(),
        }
    }

    pub fn unit_cost(&self, p: MatmulPhase) -> usize {
        let t = self.tile();
        match p {
            MatmulPhase::PackA => self.k * t.mr,
            MatmulPhase::PackB => PACK_KB * self.np() * t.nr(),
            MatmulPhase::Compute => 2 * t.mr * (self.chunk_panels() * t.nr()).min(self.n) * self.k,
        }
    }

    /// Units per chunk: consecutive units share a column chunk and so its
    /// block of B in L2; about 32 chunks on large products so two or three
    /// threads balance.
    pub fn compute_grain(&self) -> usize {
        let units = self.units(MatmulPhase::Compute);
        let flops = units * self.unit_cost(MatmulPhase::Compute);
        if flops < (1 << 20) {
            return units.max(1);
        }
        units.div_ceil(32).clamp(1, 24)
    }

    pub fn emit(&self, kb: &mut Kb, p: MatmulPhase) {
        match p {
            MatmulPhase::PackA => self.emit_pack_a(kb),
            MatmulPhase::PackB => self.emit_pack_b(kb),
            MatmulPhase::Compute => self.emit_compute(kb),
        }
    }

    /// Row panels `[mr, K]` of A, stored k-major (`mr` elements per k step),
    /// zero rows below the last row; an element is one float, or four
    /// copies of it where the micro-kernel takes broadcasts. Nothing to do
    /// when A is read in place.
    fn emit_pack_a(&self, kb: &mut Kb) {
        if self.a_from_source() {
            return;
        }
        let mr = self.tile().mr;
        let src = kb.base(self.a.loc);
        let dst = kb.base(self.pack_a);
        let mp = self.mp() as i64;
        let pd = pack_dims(&self.batch, &self.a.batch_strides);
        let (start, end) = (kb.start, kb.end);
        let m_rem = self.m - (self.mp() - 1) * mr;
        let (eb, broadcast) = (self.a_elem_bytes(), self.a_broadcast());
        kb.for_range(start, end, 1, |k, u| {
            let ai = k.b.ins().udiv_imm_u(u, mp);
            let ip = k.b.ins().urem_imm_u(u, mp);
            let off = k.unflatten_offsets(ai, &pd, std::slice::from_ref(&self.a.batch_strides))[0];
            let off = k.b.ins().iadd_imm_s(off, self.a.off as i64);
            let row0 = k.b.ins().imul_imm_s(ip, (mr as i64) * self.a.rs);
            let off = k.b.ins().iadd(off, row0);
            let sp = k.addr(src, off, 4);
            let dp = k.b.ins().imul_imm_s(u, (self.k * mr * eb) as i64);
            let dp = k.b.ins().iadd(dst, dp);
            let last = k.b.ins().icmp_imm_s(IntCC::Equal, ip, mp - 1);
            let panel = |k: &mut Kb, rows: usize| {
                let zero = k.iconst(0);
                let kk_n = k.iconst(self.k as i64);
                k.for_range(zero, kk_n, 1, |k, kk| {
                    let s = k.addr(sp, kk, 4 * self.a.cs);
                    let d = k.addr(dp, kk, (eb * mr) as i64);
                    // A transposed (its rows adjacent in memory, as in a
                    // weight gradient `xᵀ @ dy`): four rows per vector.
                    let vec_rows = if self.a.rs == 1 && !broadcast {
                        rows / 4 * 4
                    } else {
                        0
                    };
                    for r in (0..vec_rows).step_by(4) {
                        let v = k.load_v(s, (r * 4) as i32);
                        k.b.ins().store(flags(), v, d, (r * 4) as i32);
                    }
                    for r in vec_rows..mr {
                        let v = if r < rows {
                            k.load_f(s, (r as i64 * self.a.rs * 4) as i32)
                        } else {
                            k.fconst(0.0)
                        };
                        let off = (r * eb) as i32;
                        if broadcast {
                            let v = k.b.ins().splat(F32X4, v);
                            k.b.ins().store(flags(), v, d, off);
                        } else {
                            k.store_f(v, d, off);
                        }
                    }
                });
            };
            k.if_else(last, |k| panel(k, m_rem), |k| panel(k, mr));
        });
    }

    /// Column panels `[K, nr]` of B, zero columns right of the last one.
    /// A work unit is PACK_KB rows of k across every panel, so it reads
    /// each source row once, front to back, instead of one column strip of
    /// every row per panel.
    fn emit_pack_b(&self, kb: &mut Kb) {
        if self.b_direct() {
            return;
        }
        let nr = self.tile().nr();
        let src = kb.base(self.b.loc);
        let dst = kb.base(self.pack_b);
        let (np, nkp) = (self.np(), self.nkp());
        let pd = pack_dims(&self.batch, &self.b.batch_strides);
        let (start, end) = (kb.start, kb.end);
        let n_rem = self.n - (np - 1) * nr;
        let np_full = if n_rem == nr { np } else { np - 1 };
        let (rs, cs) = (self.b.rs, self.b.cs);
        let panel_bytes = (self.k * nr * 4) as i64;
        kb.for_range(start, end, 1, |k, u| {
            let bi = k.b.ins().udiv_imm_u(u, nkp as i64);
            let kp = k.b.ins().urem_imm_u(u, nkp as i64);
            let off = k.unflatten_offsets(bi, &pd, std::slice::from_ref(&self.b.batch_strides))[0];
            let off = k.b.ins().iadd_imm_s(off, self.b.off as i64);
            let k0 = k.b.ins().imul_imm_s(kp, PACK_KB as i64);
            let k1 = k.b.ins().iadd_imm_s(k0, PACK_KB as i64);
            let kn = k.iconst(self.k as i64);
            let k1 = k.b.ins().smin(k1, kn);
            // Source of (k0, column 0) and destination of panel 0 at k0.
            let s0 = k.b.ins().imul_imm_s(k0, rs);
            let s0 = k.b.ins().iadd(off, s0);
            let s0 = k.addr(src, s0, 4);
            let d0 = k.b.ins().imul_imm_s(bi, (np as i64) * panel_bytes);
            let d0 = k.b.ins().iadd(dst, d0);
            let d0 = k.addr(d0, k0, (nr * 4) as i64);
            let copy_rows = |k: &mut Kb, s: Value, d: Value, cols: usize| {
                let cnt = k.b.ins().isub(k1, k0);
                let zero = k.iconst(0);
                k.for_range(zero, cnt, 1, |k, kk| {
                    let s = k.addr(s, kk, 4 * rs);
                    let d = k.addr(d, kk, (nr * 4) as i64);
                    if cols == nr && cs == 1 {
                        for h in 0..nr / 4 {
                            let v = k.load_v(s, (h * 16) as i32);
                            k.b.ins().store(flags(), v, d, (h * 16) as i32);
                        }
                    } else {
                        for c in 0..nr {
                            let v = if c < cols {
                                k.load_f(s, (c as i64 * cs * 4) as i32)
                            } else {
                                k.fconst(0.0)
                            };
                            k.store_f(v, d, (c * 4) as i32);
                        }
                    }
                });
            };
            let npf = k.iconst(np_full as i64);
            let zero = k.iconst(0);
            k.for_range(zero, npf, 1, |k, jp| {
                let s = k.addr(s0, jp, (nr as i64) * cs * 4);
                let d = k.addr(d0, jp, panel_bytes);
                copy_rows(k, s, d, nr);
            });
            if np_full < np {
                let s = k.b.ins().iadd_imm_s(s0, (np_full * nr) as i64 * cs * 4);
                let d = k.b.ins().iadd_imm_s(d0, np_full as i64 * panel_bytes);
                copy_rows(k, s, d, n_rem);
            }
        });
    }

    fn emit_compute(&self, kb: &mut Kb) {
        let t = self.tile();
        let (mr, nr) = (t.mr, t.nr());
        let (m, n, kdim) = (self.m, self.n, self.k);
        let (mp, np) = (self.mp(), self.np());
        let direct = self.a_direct();
        let from_source = self.a_from_source();
        let in_unit = self.a_in_unit();
        let a_base = if from_source {
            kb.base(self.a.loc)
        } else {
            kb.base(self.pack_a)
        };
        let b_in_place = self.b_direct();
        let pb_base = if b_in_place {
            kb.base(self.b.loc)
        } else {
            kb.base(self.pack_b)
        };
        let c_base = kb.base(self.c);
        // Each epilogue operand's base (C's own for the product), and the
        // follow-up program's and its result's.
        let ep_bases: Vec<Value> = match &self.epilogue {
            Some(ep) => input_bases(kb, &ep.ins, c_base),
            None => Vec::new(),
        };
        let follow_bases: Option<(Vec<Value>, Value)> = self
            .epilogue
            .as_ref()
            .and_then(|ep| ep.then.as_ref())
            .map(|f| (input_bases(kb, &f.ins, c_base), kb.base(f.out)));
        let (start, end) = (kb.start, kb.end);
        let nkb = kdim.div_ceil(t.kc);
        // Blocks of equal depth (rounded up to whole unrolled iterations):
        // K = 784 runs as 4 × 196 rather than 3 × 256 + 16, whose short last
        // block would pay a full pass of C loads and stores for 16 steps.
        let kc_even = kdim.div_ceil(nkb).next_multiple_of(t.unroll.max(1));
        let (ncp, njc) = (self.chunk_panels(), self.col_chunks());
        // Per output batch: A's offset (elements in place, packed panels
        // otherwise), B's packed batch, C's offset.
        let a_bs = if from_source {
            self.a.batch_strides.clone()
        } else {
            pack_index_strides(&self.batch, &self.a.batch_strides)
        };
        let b_ps = if b_in_place {
            self.b.batch_strides.clone()
        } else {
            pack_index_strides(&self.batch, &self.b.batch_strides)
        };
        // B of panel jp, step kk: pb0 + jp·pbytes + kk·bk (+ lanes).
        let packed = !b_in_place;
        let (pbytes, bk) = if b_in_place {
            ((nr * 4) as i64, self.b.rs * 4)
        } else {
            ((kdim * nr * 4) as i64, (nr * 4) as i64)
        };
        let c_bs: Vec<i64> = super::kernel::contiguous_strides(&self.batch)
            .iter()
            .map(|s| s * (m * n) as i64)
            .collect();
        let m_rem = m - (mp - 1) * mr;
        let n_rem = n - (np - 1) * nr;
        // Column panels of full width; a narrower last one gets its own
        // tile code.
        let np_full = if n_rem == nr { np } else { np - 1 };
        let ldc = (n * 4) as i64;
        let eb = self.a_elem_bytes();
        let (row_bytes, k_bytes) = if direct {
            (self.a.rs * 4, self.a.cs * 4)
        } else {
            (eb as i64, (mr * eb) as i64)
        };
        let sliver = in_unit.then(|| kb.stack_buf((kc_even * mr * 16) as u32));
        // A product with one k block has no k-block loop, and its tiles
        // know when emitting that they overwrite C and run the epilogue.
        let k_blocks = |k: &mut Kb, body: &mut dyn FnMut(&mut Kb, Value)| {
            if nkb == 1 {
                let kbi = k.iconst(0);
                body(k, kbi);
            } else {
                k.for_const(0, nkb, |k, kbi| body(k, kbi));
            }
        };
        k_blocks(kb, &mut |k, kbi| {
            let k0 = k.b.ins().imul_imm_s(kbi, kc_even as i64);
            let kdv = k.iconst(kdim as i64);
            let kleft = k.b.ins().isub(kdv, k0);
            let kcap = k.iconst(kc_even as i64);
            let kc = k.b.ins().smin(kleft, kcap);
            let (first, last) = if nkb == 1 {
                (Cond::Always, Cond::Always)
            } else {
                let first = k.b.ins().icmp_imm_s(IntCC::Equal, kbi, 0);
                let last = k.b.ins().icmp_imm_s(IntCC::Equal, kbi, nkb as i64 - 1);
                (Cond::When(first), Cond::When(last))
            };
            // The C tile at `cptr` of column panel `jp`, with each epilogue
            // operand's address at the tile's first element.
            let c_tile = |k: &mut Kb, ptr: Value, rows: usize, cols: usize, jp: Value| {
                let epilogue = self.epilogue.as_ref().map(|ep| {
                    let c_index = k.b.ins().isub(ptr, c_base);
                    let c_index = k.b.ins().iadd_imm_s(c_index, -(self.c_off as i64) * 4);
                    let at = |k: &mut Kb, ins: &[EpilogueInput], bases: &[Value]| {
                        ins.iter()
                            .zip(bases)
                            .map(|(i, &base)| match i {
                                EpilogueInput::Product => ptr,
                                EpilogueInput::Full(_) => k.b.ins().iadd(base, c_index),
                                EpilogueInput::Row(_) => k.addr(base, jp, (nr * 4) as i64),
                                EpilogueInput::Scalar(_) => base,
                            })
                            .collect::<Vec<Value>>()
                    };
                    let ptrs = at(k, &ep.ins, &ep_bases);
                    let follow =
                        ep.then
                            .as_ref()
                            .zip(follow_bases.as_ref())
                            .map(|(f, (bases, out))| {
                                let ptrs = at(k, &f.ins, bases);
                                (&**f, ptrs, k.b.ins().iadd(*out, c_index))
                            });
                    TileEpilogue {
                        ep,
                        ptrs,
                        last,
                        follow,
                    }
                });
                CTile {
                    ptr,
                    ldc,
                    first,
                    rows,
                    cols,
                    epilogue,
                }
            };
            // Unit u = (output batch, column chunk, row panel), row panel
            // fastest: a chunk of consecutive units shares its B block.
            k.for_range(start, end, 1, |k, u| {
                let bj_u = k.b.ins().udiv_imm_u(u, mp as i64);
                let ip = k.b.ins().urem_imm_u(u, mp as i64);
                let bi = k.b.ins().udiv_imm_u(bj_u, njc as i64);
                let jc = k.b.ins().urem_imm_u(bj_u, njc as i64);
                let j0 = k.b.ins().imul_imm_s(jc, ncp as i64);
                let j1 = k.b.ins().iadd_imm_s(j0, ncp as i64);
                let npv = k.iconst(np as i64);
                let j1 = k.b.ins().smin(j1, npv);
                let npf = k.iconst(np_full as i64);
                let j1f = k.b.ins().smin(j1, npf);
                let offs = k.unflatten_offsets(
                    bi,
                    &self.batch,
                    &[a_bs.clone(), b_ps.clone(), c_bs.clone()],
                );
                let (ao, bj, coff) = (offs[0], offs[1], offs[2]);
                let pa = if from_source {
                    // a + (off + ao + ip·mr·rs + k0·cs)·4
                    let x = k.b.ins().iadd_imm_s(ao, self.a.off as i64);
                    let r0 = k.b.ins().imul_imm_s(ip, mr as i64 * self.a.rs);
                    let x = k.b.ins().iadd(x, r0);
                    let k0s = k.b.ins().imul_imm_s(k0, self.a.cs);
                    let x = k.b.ins().iadd(x, k0s);
                    k.addr(a_base, x, 4)
                } else {
                    // pack_a + ((ao·mp + ip)·K + k0)·mr·element bytes
                    let x = k.b.ins().imul_imm_s(ao, mp as i64);
                    let x = k.b.ins().iadd(x, ip);
                    let x = k.b.ins().imul_imm_s(x, kdim as i64);
                    let x = k.b.ins().iadd(x, k0);
                    k.addr(a_base, x, (mr * eb) as i64)
                };
                let a = ASrc {
                    ptr: pa,
                    row_bytes,
                    k_bytes,
                    broadcast: self.a_broadcast(),
                    packed_here: false,
                };
                let row0 = k.b.ins().imul_imm_s(ip, (mr * n) as i64);
                let crow = k.b.ins().iadd(coff, row0);
                let crow = k.b.ins().iadd_imm_s(crow, self.c_off as i64);
                let crow = k.addr(c_base, crow, 4);
                let pb0 = if b_in_place {
                    // b + (off + bj + k0·rs)·4
                    let x = k.b.ins().iadd_imm_s(bj, self.b.off as i64);
                    let k0s = k.b.ins().imul_imm_s(k0, self.b.rs);
                    let x = k.b.ins().iadd(x, k0s);
                    k.addr(pb_base, x, 4)
                } else {
                    // Panel 0 at k0: pack_b + (bj·np·K + k0)·nr·4
                    let x = k.b.ins().imul_imm_s(bj, (np * kdim) as i64);
                    let x = k.b.ins().iadd(x, k0);
                    k.addr(pb_base, x, (nr * 4) as i64)
                };
                // Edge tiles (the last rows, the narrow last panel) run a
                // small share of the work: their loops take two k steps,
                // which halves their code and compile time.
                let edge_t = Tile {
                    unroll: t.unroll.min(2),
                    ..t
                };
                let row_block = |k: &mut Kb, rows: usize| {
                    // With A packed per unit, `pa` is the sliver's source,
                    // and the tiles read the sliver in `pack_sliver`'s layout.
                    let a = match sliver {
                        Some(buf) => {
                            pack_sliver(k, (pa, self.a.rs, self.a.cs), buf, (rows, mr), kc);
                            ASrc {
                                ptr: buf,
                                row_bytes: 16,
                                k_bytes: (mr * 16) as i64,
                                broadcast: true,
                                packed_here: true,
                            }
                        }
                        None => a,
                    };
                    let t = if rows < mr { edge_t } else { t };
                    // Few rows leave too few accumulators to hide the FMA
                    // latency: such tiles take several column panels.
                    let group = panels_per_tile(rows, t.nv);
                    let mut single_from = j0;
                    if group > 1 {
                        k.for_range(j0, j1f, group as i64, |k, jp| {
                            let pb = k.addr(pb0, jp, pbytes);
                            let cptr = k.addr(crow, jp, (nr * 4) as i64);
                            let c = c_tile(k, cptr, rows, nr, jp);
                            micro_kernel(k, &t, a, (pb, pbytes, bk, group, packed), (kc, kdim), c);
                        });
                        let span = k.b.ins().isub(j1f, j0);
                        let whole = k.b.ins().udiv_imm_u(span, group as i64);
                        let done = k.b.ins().imul_imm_s(whole, group as i64);
                        single_from = k.b.ins().iadd(j0, done);
                    }
                    k.for_range(single_from, j1f, 1, |k, jp| {
                        let pb = k.addr(pb0, jp, pbytes);
                        let cptr = k.addr(crow, jp, (nr * 4) as i64);
                        let c = c_tile(k, cptr, rows, nr, jp);
                        micro_kernel(k, &t, a, (pb, pbytes, bk, 1, packed), (kc, kdim), c);
                    });
                    if np_full < np {
                        let edge = k.b.ins().icmp_imm_s(IntCC::Equal, j1, np as i64);
                        k.if_then(edge, |k| {
                            let pb = k.b.ins().iadd_imm_s(pb0, np_full as i64 * pbytes);
                            let cptr = k.b.ins().iadd_imm_s(crow, (np_full * nr * 4) as i64);
                            let jp = k.iconst(np_full as i64);
                            let c = c_tile(k, cptr, rows, n_rem, jp);
                            micro_kernel(k, &edge_t, a, (pb, pbytes, bk, 1, packed), (kc, kdim), c);
                        });
                    }
                };
                if m_rem < mr {
                    let last_row = k.b.ins().icmp_imm_s(IntCC::Equal, ip, mp as i64 - 1);
                    k.if_else(last_row, |k| row_block(k, m_rem), |k| row_block(k, mr));
                } else {
                    row_block(k, mr);
                }
            });
        });
    }
}

/// Column panels one tile spans for a tile of `rows` rows: enough that
/// the accumulators (rows · nv per panel) keep both FMA pipes busy through
/// the FMA latency, few enough to stay in registers.
fn panels_per_tile(rows: usize, nv: usize) -> usize {
    match rows * nv {
        0..=2 => 4,
        3..=4 => 2,
        _ => 1,
    }
}

/// A condition of a tile's k block: known when emitting, or computed.
#[derive(Clone, Copy)]
enum Cond {
    Always,
    When(Value),
}

/// Where a register tile's results go.
struct CTile<'a> {
    ptr: Value,
    /// Bytes between rows of C.
    ldc: i64,
    /// Whether this is the first k block: C is overwritten, not added to.
    first: Cond,
    rows: usize,
    /// Valid columns of the tile's last panel.
    cols: usize,
    epilogue: Option<TileEpilogue<'a>>,
}

/// An epilogue at one C tile.
struct TileEpilogue<'a> {
    ep: &'a Epilogue,
    /// Its operands' addresses at the tile's first element.
    ptrs: Vec<Value>,
    /// Whether this is the last k block (after which it runs).
    last: Cond,
    /// The follow-up program, its operands' addresses and its result's
    /// address at the tile's first element.
    follow: Option<(&'a Follow, Vec<Value>, Value)>,
}

/// `C[rows × panels·nr] (=|+=) A[rows, 0..kc] · B[0..kc, panels]` over
/// `panels` consecutive B panels (`b` = first panel, bytes between panels,
/// bytes between k steps, panels, packed). Edge tiles (`rows < mr`,
/// `cols < nr`) compute full vectors (B is zero-padded) but load and store
/// only the valid part of C. Each element sums its k terms in order.
fn micro_kernel(
    k: &mut Kb,
    t: &Tile,
    a: ASrc,
    (pb, pbytes, bk, panels, packed): (Value, i64, i64, usize, bool),
    (kc, k_total): (Value, usize),
    ct: CTile,
) {
    let CTile {
        ptr: c,
        ldc,
        first,
        rows,
        cols,
        epilogue,
    } = ct;
    let nr = t.nr();
    // Accumulator columns: (panel, f32x4 within the panel).
    let vcols: Vec<(usize, usize)> = (0..panels)
        .flat_map(|p| (0..t.nv).map(move |h| (p, h)))
        .collect();
    let c_off = |r: usize, (p, h): (usize, usize)| -> i32 {
        (r as i64 * ldc + (p * nr * 4 + h * 16) as i64) as i32
    };
    let lanes = |(p, h): (usize, usize)| -> usize {
        let w = if p + 1 == panels { cols } else { nr };
        w.saturating_sub(4 * h).min(4)
    };
    let zero_v = k.vconst(0.0);
    let accs: Vec<Vec<Variable>> = (0..rows)
        .map(|_| vcols.iter().map(|_| k.var(F32X4, zero_v)).collect())
        .collect();
    // After the first k block, the block's sums are added to C: each
    // accumulator starts from zero, so an element's k terms are summed in
    // runs of at most one block's depth (with one f32 chain per element,
    // a product over 40,000 positive terms was 1.05e-4 off the f64 sums;
    // 7.7e-7 in blocks).
    let add_c = |k: &mut Kb| {
        for (r, acc) in accs.iter().enumerate() {
            for (vc, var) in vcols.iter().zip(acc) {
                let off = c_off(r, *vc);
                let v = if lanes(*vc) == 4 {
                    k.load_v(c, off)
                } else {
                    let mut v = k.vconst(0.0);
                    for l in 0..lanes(*vc) {
                        let s = k.load_f(c, off + (l * 4) as i32);
                        v = k.b.ins().insertlane(v, s, l as u8);
                    }
                    v
                };
                let sum = k.b.use_var(*var);
                let v = k.b.ins().fadd(v, sum);
                k.b.def_var(*var, v);
            }
        }
    };
    // Each k step broadcasts one A element per row (or loads it already
    // broadcast, see A_BROADCAST_MIN_PANELS) and feeds it to the row's
    // FMAs. Cranelift emits only the FMA forms that overwrite a
    // multiplicand, so all but the last FMA of a row take a register copy
    // of the broadcast (free: moves are renamed, not executed), and each
    // result lands in the register its broadcast or copy held. Every odd
    // step visits rows and columns in reverse: a step moves each
    // accumulator into the register the previous one freed, the reversed
    // step moves it back, and an iteration of two steps ends with every
    // accumulator where it started, with no moves on the loop edge. The
    // kernel is compiled without the optimiser (which would reorder the
    // steps and load later broadcasts before earlier FMAs).
    //
    // Measured on this machine's core (in a loop over data in L1): 39–40
    // GFLOP/s against 24–29 for the earlier form, which loaded one
    // broadcast per FMA (broadcast loads issue at most two per cycle, the
    // same rate as FMAs) and ended each iteration with ten moves.
    let pa_v = k.var(I64, a.ptr);
    // Packed B is zero-padded; B read in place is not, so its narrow last
    // panel is loaded lane by lane.
    let pb_v = k.var(I64, pb);
    let step = |k: &mut Kb, unroll: usize| {
        let ap = k.b.use_var(pa_v);
        let bp = k.b.use_var(pb_v);
        for u in 0..unroll {
            let bv: Vec<Value> = vcols
                .iter()
                .map(|&(p, h)| {
                    let off = (p as i64 * pbytes + u as i64 * bk + (h * 16) as i64) as i32;
                    let n = lanes((p, h));
                    if packed || n == 4 {
                        return k.b.ins().load(F32X4, ro_flags(), bp, off);
                    }
                    let mut v = k.vconst(0.0);
                    for l in 0..n {
                        let s = k.b.ins().load(F32, ro_flags(), bp, off + (l * 4) as i32);
                        v = k.b.ins().insertlane(v, s, l as u8);
                    }
                    v
                })
                .collect();
            for r in step_order(accs.len(), u % 2 == 1) {
                let off = (r as i64 * a.row_bytes + u as i64 * a.k_bytes) as i32;
                let x = if a.broadcast {
                    let fl = if a.packed_here { flags() } else { ro_flags() };
                    k.b.ins().load(F32X4, fl, ap, off)
                } else {
                    let s = k.b.ins().load(F32, ro_flags(), ap, off);
                    k.b.ins().splat(F32X4, s)
                };
                for i in step_order(vcols.len(), u % 2 == 1) {
                    let var = accs[r][i];
                    let old = k.b.use_var(var);
                    let new = k.b.ins().fma(x, bv[i], old);
                    k.b.def_var(var, new);
                }
            }
        }
        let next = k.b.ins().iadd_imm_s(ap, unroll as i64 * a.k_bytes);
        k.b.def_var(pa_v, next);
        let b2 = k.b.ins().iadd_imm_s(bp, unroll as i64 * bk);
        k.b.def_var(pb_v, b2);
    };
    let zero = k.iconst(0);
    let un = t.unroll.max(1);
    k.for_range(zero, kc, un as i64, |k, _| step(k, un));
    // Every k block's depth is a multiple of `un` where K is (the blocks
    // before the last are whole unrolled iterations): then the loop above
    // covered it.
    if un > 1 && !k_total.is_multiple_of(un) {
        // The loop above ran kc rounded down to a multiple of `un`.
        let tail = if un.is_power_of_two() {
            k.b.ins().band_imm_s(kc, un as i64 - 1)
        } else {
            k.b.ins().urem_imm_u(kc, un as i64)
        };
        k.for_range(zero, tail, 1, |k, _| step(k, 1));
    }
    if let Cond::When(first) = first {
        let not_first = k.b.ins().bxor_imm_u(first, 1);
        k.if_then(not_first, add_c);
    }
    if let Some(TileEpilogue {
        ep,
        ptrs,
        last,
        follow,
    }) = epilogue
    {
        let run_epilogue = |k: &mut Kb| {
            // A vector at byte offset `off` of `p`, lane by lane at C's
            // narrow right edge (operands are not padded).
            let load = |k: &mut Kb, p: Value, off: i32, vc: (usize, usize)| {
                k.load_lanes(p, off, lanes(vc))
            };
            for (i, vc) in vcols.iter().enumerate() {
                let col = ((vc.0 * nr + vc.1 * 4) * 4) as i32;
                // Operands that do not vary along the tile's rows.
                let fixed = |k: &mut Kb, ins: &[EpilogueInput], ptrs: &[Value]| {
                    ins.iter()
                        .zip(ptrs)
                        .map(|(inp, &p)| match inp {
                            EpilogueInput::Row(_) => Some(load(k, p, col, *vc)),
                            EpilogueInput::Scalar(_) => {
                                let s = k.load_f(p, 0);
                                Some(k.b.ins().splat(F32X4, s))
                            }
                            EpilogueInput::Product | EpilogueInput::Full(_) => None,
                        })
                        .collect::<Vec<Option<Value>>>()
                };
                // A program's operands at row `r`, `product` its `Product`.
                let args = |k: &mut Kb,
                            (ins, ptrs, fixed): (&[EpilogueInput], &[Value], &[Option<Value>]),
                            r: usize,
                            product: Value| {
                    ins.iter()
                        .zip(ptrs)
                        .zip(fixed)
                        .map(|((inp, &p), f)| {
                            vec![match (inp, f) {
                                (_, Some(v)) => *v,
                                (EpilogueInput::Product, _) => product,
                                _ => load(k, p, c_off(r, *vc), *vc),
                            }]
                        })
                        .collect::<Vec<Vec<Value>>>()
                };
                let ep_fixed = fixed(k, &ep.ins, &ptrs);
                let follow_fixed = follow.as_ref().map(|(f, fptrs, _)| fixed(k, &f.ins, fptrs));
                for (r, acc) in accs.iter().enumerate() {
                    let product = k.b.use_var(acc[i]);
                    let a = args(k, (&ep.ins, &ptrs, &ep_fixed), r, product);
                    let Some(&y) = eval_program(k, &ep.prog, &a, false).first() else {
                        continue;
                    };
                    k.b.def_var(acc[i], y);
                    if let (Some((f, fptrs, out)), Some(ff)) = (&follow, &follow_fixed) {
                        let a = args(k, (&f.ins, fptrs, ff), r, y);
                        if let Some(&z) = eval_program(k, &f.prog, &a, false).first() {
                            store_lanes(k, z, *out, c_off(r, *vc), lanes(*vc));
                        }
                    }
                }
            }
        };
        match last {
            Cond::Always => run_epilogue(k),
            Cond::When(last) => k.if_then(last, run_epilogue),
        }
    }
    for (r, acc) in accs.iter().enumerate() {
        for (vc, var) in vcols.iter().zip(acc) {
            let off = c_off(r, *vc);
            let v = k.b.use_var(*var);
            store_lanes(k, v, c, off, lanes(*vc));
        }
    }
}

/// Each epilogue operand's base address; C's own (`c_base`) for the
/// product.
fn input_bases(kb: &mut Kb, ins: &[EpilogueInput], c_base: Value) -> Vec<Value> {
    ins.iter()
        .map(|i| match *i {
            EpilogueInput::Product => c_base,
            EpilogueInput::Full(l) | EpilogueInput::Row(l) | EpilogueInput::Scalar(l) => kb.base(l),
        })
        .collect()
}

/// Store the first `n` lanes of `v` at byte offset `off` of `p`: the
/// whole vector when `n` is 4, else lane by lane (C's narrow right edge).
pub(super) fn store_lanes(k: &mut Kb, v: Value, p: Value, off: i32, n: usize) {
    if n == 4 {
        k.b.ins().store(flags(), v, p, off);
    } else {
        for l in 0..n {
            let s = k.b.ins().extractlane(v, l as u8);
            k.store_f(s, p, off + (l * 4) as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::{compile, JitOptions};
    use crate::ir::{Conv2d, Graph, Op, OutputKind, TensorType};
    use crate::tensor::Tensor;
    use std::collections::BTreeMap;

    /// Deterministic values in [-1, 1).
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Run `g` on 1, 2 and 3 threads; every run must give the same bits.
    fn run_all_threads(g: &Graph, feeds: &BTreeMap<String, Tensor>) -> Vec<f32> {
        let mut first: Option<Vec<f32>> = None;
        for threads in [1, 2, 3] {
            let m = compile(g, &JitOptions { threads }).expect("compiles");
            assert_eq!(m.interpreted_kernels(), 0);
            let out = m.run(feeds).expect("runs");
            let c = out["c"].as_f32().expect("f32 output").to_vec();
            match &first {
                None => first = Some(c),
                Some(f) => {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(f), bits(&c), "threads={threads} changed the bits");
                }
            }
        }
        first.unwrap_or_default()
    }

    /// `[ba?, m, k] @ [bb?, k, n]` (a missing or size-1 batch broadcasts)
    /// against an f64 reference, with the f32 error bound K·ε·Σ|a·b|.
    fn check(a_batch: Option<usize>, b_batch: Option<usize>, m: usize, k: usize, n: usize) {
        let ba = a_batch.unwrap_or(1);
        let bb = b_batch.unwrap_or(1);
        let batch = ba.max(bb);
        let shape = |b: Option<usize>, r: usize, c: usize| match b {
            Some(b) => vec![b, r, c],
            None => vec![r, c],
        };
        let (sa, sb) = (shape(a_batch, m, k), shape(b_batch, k, n));
        let (va, vb) = (data(ba * m * k, 1), data(bb * k * n, 2));
        let mut g = Graph::new();
        let a = g.add_leaf(
            Op::Input { name: "a".into() },
            TensorType::f32(sa.clone()),
            None,
        );
        let b = g.add_leaf(
            Op::Input { name: "b".into() },
            TensorType::f32(sb.clone()),
            None,
        );
        let c = g.add(Op::MatMul, &[a, b], None).expect("matmul");
        g.push_output("c", OutputKind::Output, c);
        let mut feeds = BTreeMap::new();
        feeds.insert("a".to_string(), Tensor::f32(sa, va.clone()));
        feeds.insert("b".to_string(), Tensor::f32(sb, vb.clone()));
        let got = run_all_threads(&g, &feeds);
        assert_eq!(got.len(), batch * m * n);
        for p in 0..batch {
            let (pa, pb) = (if ba == 1 { 0 } else { p }, if bb == 1 { 0 } else { p });
            for i in 0..m {
                for j in 0..n {
                    let (mut s, mut mag) = (0f64, 0f64);
                    for kk in 0..k {
                        let x = va[(pa * m + i) * k + kk] as f64 * vb[(pb * k + kk) * n + j] as f64;
                        s += x;
                        mag += x.abs();
                    }
                    let c = got[(p * m + i) * n + j] as f64;
                    let tol = (k as f64) * f32::EPSILON as f64 * mag + 1e-30;
                    assert!(
                        (c - s).abs() <= tol,
                        "{m}x{k}x{n} batch {p} C[{i},{j}] = {c}, want {s} ± {tol}"
                    );
                }
            }
        }
    }

    #[test]
    fn edges_and_blocks_match_an_f64_reference() {
        let t = TILE;
        // Row and column edges of every width, k over several KC blocks
        // with a remainder (and odd, for the unrolled loop's tail), n over
        // several NCP blocks; few row panels read B in place, many pack it.
        for m0 in [0, B_DIRECT_MAX_PANELS * t.mr] {
            check(None, None, m0 + 1, 1, 1);
            check(None, None, m0 + t.mr + 1, 3, t.nr() + 1);
            check(None, None, m0 + 2 * t.mr - 1, t.kc + 3, 3);
            check(
                None,
                None,
                m0 + 3 * t.mr + 2,
                2 * t.kc + 1,
                t.ncp * t.nr() + 5,
            );
            check(None, None, m0 + 17, 7, t.ncp * t.nr() * 2);
            check(None, None, m0 + t.mr, 6, 3);
            for cols in 1..t.nr() {
                check(None, None, m0 + t.mr, 5, t.nr() + cols);
            }
            // Edge rows spanning several panels per tile, with panels left
            // over for one-panel tiles and a narrow last panel.
            for rows in 1..t.mr {
                check(None, None, m0 + t.mr + rows, 9, 7 * t.nr() + 3);
                check(None, None, m0 + rows, t.kc + 1, 4 * t.nr());
            }
        }
    }

    #[test]
    fn large_products_take_deep_blocks_and_match_an_f64_reference() {
        let l = LARGE_TILE;
        // Just large enough: row and column edges, two deep k blocks with
        // a remainder, and two column chunks with a narrow last panel.
        let (m, k, n) = (LARGE_MIN_PANELS * l.mr + 3, l.kc + 45, l.ncp * l.nr() + 5);
        let mm = |m: usize, k: usize, n: usize| Matmul {
            batch: vec![],
            m,
            k,
            n,
            a: MmOperand {
                loc: Loc::Arena(0),
                off: 0,
                batch_strides: vec![],
                rs: k as i64,
                cs: 1,
            },
            b: MmOperand {
                loc: Loc::Arena(0),
                off: 0,
                batch_strides: vec![],
                rs: n as i64,
                cs: 1,
            },
            c: Loc::Arena(0),
            c_off: 0,
            pack_a: Loc::Arena(0),
            pack_b: Loc::Arena(0),
            split: false,
            epilogue: None,
        };
        let t = mm(m, k, n).tile();
        assert_eq!(t, mm(m, k, n).large_tile(host_l2_bytes()));
        assert_eq!((t.mr, t.nv, t.kc), (l.mr, l.nv, l.kc));
        // Its units pack A themselves: no arena buffer, no packing phase.
        assert_eq!(mm(m, k, n).pack_a_bytes(), 0);
        assert_eq!(mm(m, k, n).units(MatmulPhase::PackA), 0);
        let usual = "a smaller product keeps the usual blocks";
        assert_eq!(mm(m, LARGE_MIN_K - 1, n).tile().kc, TILE.kc / 2, "{usual}");
        let rows = (LARGE_MIN_PANELS - 1) * l.mr;
        assert_eq!(mm(rows, k, n).tile().kc, TILE.kc / 2, "{usual}");
        let cols = (LARGE_MIN_PANELS - 1) * l.nr();
        assert_eq!(mm(m, k, cols).tile().kc, TILE.kc / 2, "{usual}");
        // B blocks fit half of a large L2; a small or unknown one keeps
        // the wide blocks.
        let ncp = |k: usize, l2: Option<usize>| mm(m, k, n).large_tile(l2).ncp;
        assert_eq!(ncp(1024, None), 128);
        assert_eq!(ncp(1024, Some(1 << 20)), 128);
        assert_eq!(ncp(1024, Some(2 << 20)), 32);
        assert_eq!(ncp(4096, Some(2 << 20)), 32);
        assert_eq!(ncp(512, Some(2 << 20)), 64);
        assert_eq!(ncp(300, Some(2 << 20)), 108);
        assert_eq!(ncp(1024, Some(64 << 20)), 128);
        assert_eq!(ncp(1024, Some(512 << 10)), 128);
        assert_eq!(ncp(1024, Some(3 << 20)), 48);
        assert_eq!(cache_bytes("2048K\n"), Some(2 << 20));
        assert_eq!(cache_bytes("1M"), Some(1 << 20));
        assert_eq!(cache_bytes("512"), Some(512));
        assert_eq!(cache_bytes("lots"), None);
        check(None, None, m, k, n);
        // Per batch, with B broadcast over A's batch.
        check(
            Some(2),
            None,
            m,
            LARGE_MIN_K + 7,
            LARGE_MIN_PANELS * l.nr() + 1,
        );
    }

    #[test]
    fn batched_and_broadcast_operands_match_an_f64_reference() {
        for m in [7, 41] {
            check(Some(3), Some(3), m, 9, 11);
            check(Some(4), None, m, 260, 10);
            check(None, Some(2), m, 5, 13);
            check(Some(1), Some(3), m, 8, 9);
            // Enough column panels for A packed as broadcasts, per batch
            // and broadcast over B's batch.
            let wide = A_BROADCAST_MIN_PANELS * TILE.nr() + 3;
            check(Some(3), Some(3), m, 9, wide);
            check(None, Some(2), m, 131, wide);
        }
    }

    #[test]
    fn operands_are_packed_only_where_it_pays() {
        let op = |rs: i64, cs: i64| MmOperand {
            loc: Loc::Arena(0),
            off: 0,
            batch_strides: vec![],
            rs,
            cs,
        };
        let mut mm = Matmul {
            batch: vec![],
            m: 12,
            k: 7,
            n: 9,
            a: op(7, 1),
            b: op(9, 1),
            c: Loc::Arena(0),
            c_off: 0,
            pack_a: Loc::Arena(0),
            pack_b: Loc::Arena(0),
            split: false,
            epilogue: None,
        };
        assert_eq!(mm.pack_a_bytes(), 0);
        assert_eq!(mm.units(MatmulPhase::PackA), 0);
        mm.a = op(1, 12);
        let panels = 12usize.div_ceil(TILE.mr);
        assert_eq!(mm.pack_a_bytes(), panels * TILE.mr * 7 * 4);
        assert_eq!(mm.units(MatmulPhase::PackA), panels);
        // Many column panels: even contiguous A is packed, each element
        // stored as a broadcast vector of four.
        mm.a = op(7, 1);
        mm.n = A_BROADCAST_MIN_PANELS * TILE.nr();
        assert_eq!(mm.pack_a_bytes(), panels * TILE.mr * 7 * 16);
        assert_eq!(mm.units(MatmulPhase::PackA), panels);
        // On several threads each unit packs its own sliver instead, but
        // an A that batches share is still packed once for all of them.
        mm.split = true;
        assert_eq!(mm.pack_a_bytes(), 0);
        assert_eq!(mm.units(MatmulPhase::PackA), 0);
        mm.batch = vec![3];
        mm.b.batch_strides = vec![63];
        mm.a.batch_strides = vec![0];
        assert_eq!(mm.pack_a_bytes(), panels * TILE.mr * 7 * 16);
        assert_eq!(mm.units(MatmulPhase::PackA), panels);
        mm.a.batch_strides = vec![84];
        assert_eq!(mm.pack_a_bytes(), 0);
        mm.batch = vec![];
        mm.a.batch_strides = vec![];
        mm.b.batch_strides = vec![];
        mm.n = 9;
        mm.a = op(1, 12);
        assert_eq!(mm.pack_a_bytes(), panels * TILE.mr * 7 * 4);
        mm.split = false;
        mm.a = op(7, 1);
        // Three row panels read contiguous B in place; many pack it unless
        // it is small, and so does a strided B or rows 4 KiB apart.
        assert_eq!(mm.pack_b_bytes(), 0);
        assert_eq!(mm.units(MatmulPhase::PackB), 0);
        let col_panels = 9usize.div_ceil(TILE.nr());
        mm.b = op(1, 7);
        assert_eq!(mm.pack_b_bytes(), col_panels * TILE.nr() * 7 * 4);
        mm.b = op(1024, 1);
        assert!(mm.pack_b_bytes() > 0);
        mm.b = op(9, 1);
        mm.m = 100;
        assert_eq!(mm.pack_b_bytes(), 0);
        mm.k = B_DIRECT_MAX_BYTES / (9 * 4) + 1;
        assert_eq!(mm.pack_b_bytes(), col_panels * TILE.nr() * mm.k * 4);
        assert!(mm.units(MatmulPhase::PackB) > 0);
    }

    /// The input gradient of a convolution multiplies by the transposed
    /// filter: a strided A that goes through the packed path. k (the output
    /// channels) spans two KC blocks.
    #[test]
    fn transposed_a_through_conv_input_gradient_matches_interpreter() {
        let (n, o, ch, h, w, kh) = (2, TILE.kc + 5, 3, 4, 5, 3);
        let conv = Conv2d {
            stride: 1,
            dilation: 1,
            pad: [1, 1, 1, 1],
        };
        let mut g = Graph::new();
        let dy = g.add_leaf(
            Op::Input { name: "dy".into() },
            TensorType::f32(vec![n, o, h, w]),
            None,
        );
        let f = g.add_leaf(
            Op::Input { name: "w".into() },
            TensorType::f32(vec![o, ch, kh, kh]),
            None,
        );
        let dx = g
            .add(
                Op::ConvGradInput {
                    conv,
                    input_hw: [h, w],
                },
                &[dy, f],
                None,
            )
            .expect("conv_grad_input");
        g.push_output("c", OutputKind::Output, dx);
        let mut feeds = BTreeMap::new();
        feeds.insert(
            "dy".to_string(),
            Tensor::f32(vec![n, o, h, w], data(n * o * h * w, 3)),
        );
        feeds.insert(
            "w".to_string(),
            Tensor::f32(vec![o, ch, kh, kh], data(o * ch * kh * kh, 4)),
        );
        let got = run_all_threads(&g, &feeds);
        let want = crate::interp::run_f32(&g, &feeds).expect("interpreter runs");
        let want = want["c"].as_f32().expect("f32");
        assert_eq!(got.len(), want.len());
        for (i, (a, e)) in got.iter().zip(want).enumerate() {
            // Sums of up to o·9 products of magnitude < 1.
            assert!(
                (a - e).abs() <= 1e-5 * (1.0 + e.abs()) * 10.0,
                "dx[{i}]: {a} vs {e}"
            );
        }
    }
}
