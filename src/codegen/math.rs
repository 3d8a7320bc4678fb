//! Vectorised f32x4 approximations of exp, log, tanh and sigmoid, inlined
//! into elementwise kernels (Cranelift has no transcendental instructions,
//! and a libcall per element would cost more than the arithmetic).
//!
//! Polynomials are Cephes' single-precision ones with Cody–Waite range
//! reduction. Stated bound, checked over every 1021st f32 bit pattern in
//! tests/jit.rs: relative error below 2.5e-7 (about 2 ulp) wherever the true
//! result is a normal float (measured: exp 1.2e-7, log 8e-8, tanh 1.3e-7,
//! sigmoid 1.9e-7), absolute error below 1e-40 where it is subnormal.
//! Special values follow IEEE: NaN → NaN, exp(+inf) = inf, exp(-inf) = 0,
//! log(0) = -inf, log(x < 0) = NaN, log(+inf) = inf, tanh(±inf) = ±1,
//! sigmoid(+inf) = 1, sigmoid(-inf) = 0.

use super::emit::Kb;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{Type, F32X4, I32, I32X4};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use std::sync::OnceLock;

/// Cephes' polynomial coefficients, highest degree first.
pub(super) const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
const LOG_P: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_4e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];
const TANH_P: [f32; 5] = [
    -5.704_988_7e-3,
    2.063_909e-2,
    -5.373_971_6e-2,
    1.333_144_2e-1,
    -3.333_328e-1,
];
/// Round-to-nearest shift: `x + MAGIC - MAGIC` rounds `x` to an integer,
/// which the low mantissa bits of `x + MAGIC` hold.
pub(super) const MAGIC: f32 = 12_582_912.0;

/// The other f32 constants of the functions below.
const SCALARS: [f32; 22] = [
    -104.0,
    89.0,
    std::f32::consts::LOG2_E,
    MAGIC,
    0.693_359_4,
    -2.121_944_4e-4,
    1.0,
    0.0,
    -0.0,
    2.0,
    0.625,
    -0.5,
    -23.0,
    126.0,
    8_388_608.0,
    f32::MIN_POSITIVE,
    std::f32::consts::FRAC_1_SQRT_2,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    -87.0,
    std::f32::consts::LN_2,
];

/// Integer lane constants (exponent bias, mantissa mask, 0.5's bits).
const INTS: [u32; 3] = [127, 0x007f_ffff, 0x3f00_0000];

/// One splatted constant, 16-byte aligned.
#[repr(align(16))]
pub struct Splat(pub [u32; 4]);

/// Every constant above as a splat, in a table that lives as long as the
/// process: kernels address it directly.
pub fn consts() -> &'static [Splat] {
    static TABLE: OnceLock<Vec<Splat>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut bits: Vec<u32> = Vec::new();
        let all = EXP_P.iter().chain(&LOG_P).chain(&TANH_P).chain(&SCALARS);
        for b in all.map(|v| v.to_bits()).chain(INTS) {
            if !bits.contains(&b) {
                bits.push(b);
            }
        }
        bits.into_iter().map(|b| Splat([b; 4])).collect()
    })
}

/// Loads of the constant table: nothing writes it, a load cannot trap.
fn const_flags() -> MemFlagsData {
    MemFlagsData::trusted().with_readonly().with_aligned()
}

impl Kb<'_> {
    /// A splatted constant: a load from [`consts`], which folds into the
    /// instruction that uses it (a register-held splat would need one
    /// instruction more per use, or registers the interleaved chains need).
    fn fv(&mut self, v: f32) -> Value {
        self.table_const(F32X4, v.to_bits())
    }

    /// A splatted i32 constant, from the same table.
    fn iv(&mut self, bits: u32) -> Value {
        self.table_const(I32X4, bits)
    }

    /// A splat of the f32 or i32 lane `bits` of type `ty` from [`consts`],
    /// which folds into the instruction that uses it; a lane the table
    /// lacks is built in registers.
    pub fn table_const(&mut self, ty: Type, bits: u32) -> Value {
        let table = consts();
        match table.iter().position(|c| c.0[0] == bits) {
            Some(i) => {
                let base = self.static_table(table.as_ptr() as usize);
                self.b.ins().load(ty, const_flags(), base, (16 * i) as i32)
            }
            None => {
                let s = self.b.ins().iconst(I32, bits as i64);
                let v = self.b.ins().splat(I32X4, s);
                if ty == I32X4 {
                    v
                } else {
                    self.b.ins().bitcast(ty, MemFlagsData::new(), v)
                }
            }
        }
    }

    /// Lanes of `a` where `mask` (an fcmp result) is set, else of `b`.
    pub fn vsel(&mut self, mask: Value, a: Value, b: Value) -> Value {
        let m = self.b.ins().bitcast(F32X4, MemFlagsData::new(), mask);
        self.b.ins().bitselect(m, a, b)
    }

    pub fn vcmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        self.b.ins().fcmp(cc, a, b)
    }

    /// `f` on each of `xs`: every math function below takes a group of
    /// independent vectors and emits each of its operations for all of them
    /// before the next, so the code interleaves independent dependency
    /// chains. Cranelift does not schedule instructions; one chain alone is
    /// latency-bound (exp is ~20 dependent operations deep).
    fn each(&mut self, xs: &[Value], mut f: impl FnMut(&mut Self, Value) -> Value) -> Vec<Value> {
        xs.iter().map(|&x| f(self, x)).collect()
    }

    fn each2(
        &mut self,
        xs: &[Value],
        ys: &[Value],
        mut f: impl FnMut(&mut Self, Value, Value) -> Value,
    ) -> Vec<Value> {
        xs.iter().zip(ys).map(|(&x, &y)| f(self, x, y)).collect()
    }

    /// Horner evaluation `((c0·x + c1)·x + …)` of every `x`.
    fn horner(&mut self, xs: &[Value], coeffs: &[f32]) -> Vec<Value> {
        let mut acc = self.each(xs, |k, _| k.fv(coeffs[0]));
        for &c in &coeffs[1..] {
            acc = self.each2(&acc, xs, |k, a, x| {
                let cv = k.fv(c);
                k.b.ins().fma(a, x, cv)
            });
        }
        acc
    }

    /// `2^k` for integer lanes `k` in the normal exponent range.
    fn pow2i(&mut self, k: Value) -> Value {
        let biasv = self.iv(127);
        let e = self.b.ins().iadd(k, biasv);
        let e = self.b.ins().ishl_imm_u(e, 23);
        self.b.ins().bitcast(F32X4, MemFlagsData::new(), e)
    }

    /// `min(max(x, lo), hi)` lane-wise, NaN lanes kept. Written as the
    /// compare-and-select shape Cranelift lowers to one `maxps`/`minps`
    /// each (x86 returns the second operand when either is NaN, which is
    /// `x` here); `fmax`/`fmin` would cost seven instructions each for
    /// IEEE signed-zero and NaN rules the clamp does not need.
    fn clamp_keep_nan(&mut self, x: Value, lo: Value, hi: Value) -> Value {
        let below = self.vcmp(FloatCC::LessThan, x, lo);
        let xc = self.vsel(below, lo, x);
        let above = self.vcmp(FloatCC::LessThan, hi, xc);
        self.vsel(above, hi, xc)
    }

    pub fn vexp(&mut self, x: Value) -> Value {
        self.vexp_n(&[x])[0]
    }

    pub fn vexp_n(&mut self, xs: &[Value]) -> Vec<Value> {
        let xc = self.each(xs, |k, x| {
            let lo = k.fv(-104.0);
            let hi = k.fv(89.0);
            k.clamp_keep_nan(x, lo, hi)
        });
        let t = self.each(&xc, |k, x| {
            let log2e = k.fv(std::f32::consts::LOG2_E);
            k.b.ins().fmul(log2e, x)
        });
        // Round to nearest with the 1.5·2²³ trick: the sum's low mantissa
        // bits hold the integer, which saves converting n to an integer
        // separately (t stays within ±151, far inside the trick's range).
        let shifted = self.each(&t, |k, t| {
            let magic = k.fv(MAGIC);
            k.b.ins().fadd(t, magic)
        });
        let nn = self.each(&shifted, |k, s| {
            let magic = k.fv(MAGIC);
            let n = k.b.ins().fsub(s, magic);
            k.b.ins().fneg(n)
        });
        let r = self.each2(&nn, &xc, |k, nn, x| {
            let c1 = k.fv(0.693_359_4);
            k.b.ins().fma(nn, c1, x)
        });
        let r = self.each2(&nn, &r, |k, nn, r| {
            let c2 = k.fv(-2.121_944_4e-4);
            k.b.ins().fma(nn, c2, r)
        });
        let p = self.horner(&r, &EXP_P);
        let r2 = self.each(&r, |k, r| k.b.ins().fmul(r, r));
        let rp1 = self.each(&r, |k, r| {
            let one = k.fv(1.0);
            k.b.ins().fadd(r, one)
        });
        let p: Vec<Value> = (0..xs.len())
            .map(|i| self.b.ins().fma(p[i], r2[i], rp1[i]))
            .collect();
        // 2^n split in two factors so that n down to -150 stays exact.
        let ni = self.each(&shifted, |k, s| {
            let sbits = k.b.ins().bitcast(I32X4, MemFlagsData::new(), s);
            let mbits = k.iv(MAGIC.to_bits());
            k.b.ins().isub(sbits, mbits)
        });
        let n1 = self.each(&ni, |k, n| k.b.ins().sshr_imm_u(n, 1));
        let y = self.each2(&p, &n1, |k, p, n1| {
            let s1 = k.pow2i(n1);
            k.b.ins().fmul(p, s1)
        });
        (0..xs.len())
            .map(|i| {
                let n2 = self.b.ins().isub(ni[i], n1[i]);
                let s2 = self.pow2i(n2);
                self.b.ins().fmul(y[i], s2)
            })
            .collect()
    }

    pub fn vlog(&mut self, x: Value) -> Value {
        self.vlog_n(&[x])[0]
    }

    pub fn vlog_n(&mut self, xs: &[Value]) -> Vec<Value> {
        let is_den = self.each(xs, |k, x| {
            let tiny = k.fv(f32::MIN_POSITIVE);
            k.vcmp(FloatCC::LessThan, x, tiny)
        });
        let bits = self.each2(xs, &is_den, |k, x, is_den| {
            let big = k.fv(8_388_608.0);
            let xs = k.b.ins().fmul(x, big);
            let xn = k.vsel(is_den, xs, x);
            k.b.ins().bitcast(I32X4, MemFlagsData::new(), xn)
        });
        let xn_e = self.each2(&bits, &is_den, |k, bits, is_den| {
            let m23 = k.fv(-23.0);
            let zero = k.fv(0.0);
            let eadj = k.vsel(is_den, m23, zero);
            let ebits = k.b.ins().ushr_imm_u(bits, 23);
            let ef = k.b.ins().fcvt_from_sint(F32X4, ebits);
            let c126 = k.fv(126.0);
            let e = k.b.ins().fsub(ef, c126);
            k.b.ins().fadd(e, eadj)
        });
        // The mantissa of the (possibly rescaled) input, in [0.5, 1).
        let m_raw = self.each(&bits, |k, bits| {
            let mant_mask = k.iv(0x007f_ffff);
            let half = k.iv(0x3f00_0000);
            let mb = k.b.ins().band(bits, mant_mask);
            let mb = k.b.ins().bor(mb, half);
            k.b.ins().bitcast(F32X4, MemFlagsData::new(), mb)
        });
        let small = self.each(&m_raw, |k, m| {
            let sqrthf = k.fv(std::f32::consts::FRAC_1_SQRT_2);
            k.vcmp(FloatCC::LessThan, m, sqrthf)
        });
        let e = self.each2(&xn_e, &small, |k, e, small| {
            let one = k.fv(1.0);
            let zero = k.fv(0.0);
            let e_dec = k.vsel(small, one, zero);
            k.b.ins().fsub(e, e_dec)
        });
        let m = self.each2(&m_raw, &small, |k, m, small| {
            let zero = k.fv(0.0);
            let m_add = k.vsel(small, m, zero);
            let m = k.b.ins().fadd(m, m_add);
            let one = k.fv(1.0);
            k.b.ins().fsub(m, one)
        });
        let z = self.each(&m, |k, m| k.b.ins().fmul(m, m));
        let p = self.horner(&m, &LOG_P);
        (0..xs.len())
            .map(|i| {
                let k = &mut *self;
                let (m, z, e, x) = (m[i], z[i], e[i], xs[i]);
                let mz = k.b.ins().fmul(m, z);
                let y = k.b.ins().fmul(p[i], mz);
                let c2 = k.fv(-2.121_944_4e-4);
                let y = k.b.ins().fma(e, c2, y);
                let mhalf = k.fv(-0.5);
                let y = k.b.ins().fma(z, mhalf, y);
                let r = k.b.ins().fadd(m, y);
                let c1 = k.fv(0.693_359_4);
                let r = k.b.ins().fma(e, c1, r);
                // Special inputs, last one wins.
                let zero = k.fv(0.0);
                let is_zero = k.vcmp(FloatCC::Equal, x, zero);
                let ninf = k.fv(f32::NEG_INFINITY);
                let r = k.vsel(is_zero, ninf, r);
                let pinf = k.fv(f32::INFINITY);
                let is_inf = k.vcmp(FloatCC::Equal, x, pinf);
                let r = k.vsel(is_inf, pinf, r);
                let bad = k.vcmp(FloatCC::UnorderedOrLessThan, x, zero);
                let nan = k.fv(f32::NAN);
                k.vsel(bad, nan, r)
            })
            .collect()
    }

    pub fn vtanh(&mut self, x: Value) -> Value {
        self.vtanh_n(&[x])[0]
    }

    pub fn vtanh_n(&mut self, xs: &[Value]) -> Vec<Value> {
        // Large |x|: 1 - 2/(e^{2|x|} + 1), sign restored below.
        let t = self.each(xs, |k, x| {
            let ax = k.b.ins().fabs(x);
            let two = k.fv(2.0);
            k.b.ins().fmul(ax, two)
        });
        let e = self.vexp_n(&t);
        let big = self.each2(&e, xs, |k, e, x| {
            let one = k.fv(1.0);
            let two = k.fv(2.0);
            let d = k.b.ins().fadd(e, one);
            let q = k.b.ins().fdiv(two, d);
            let big = k.b.ins().fsub(one, q);
            let neg0 = k.fv(-0.0);
            let sign = k.b.ins().band(x, neg0);
            k.b.ins().bor(big, sign)
        });
        // Small |x|: odd polynomial, accurate where the formula cancels.
        let z = self.each(xs, |k, x| k.b.ins().fmul(x, x));
        let p = self.horner(&z, &TANH_P);
        (0..xs.len())
            .map(|i| {
                let k = &mut *self;
                let x = xs[i];
                let pz = k.b.ins().fmul(p[i], z[i]);
                let small = k.b.ins().fma(pz, x, x);
                let ax = k.b.ins().fabs(x);
                let lim = k.fv(0.625);
                let is_big = k.vcmp(FloatCC::GreaterThanOrEqual, ax, lim);
                k.vsel(is_big, big[i], small)
            })
            .collect()
    }

    pub fn vsigmoid(&mut self, x: Value) -> Value {
        self.vsigmoid_n(&[x])[0]
    }

    pub fn vsigmoid_n(&mut self, xs: &[Value]) -> Vec<Value> {
        // e = exp(-|x|) never overflows: σ(x) = 1/(1+e) for x ≥ 0 and
        // e/(1+e) for x < 0, which keeps tiny (subnormal) results accurate.
        let nx = self.each(xs, |k, x| {
            let ax = k.b.ins().fabs(x);
            k.b.ins().fneg(ax)
        });
        let e = self.vexp_n(&nx);
        self.each2(&e, xs, |k, e, x| {
            let one = k.fv(1.0);
            let d = k.b.ins().fadd(e, one);
            let zero = k.fv(0.0);
            let neg = k.vcmp(FloatCC::LessThan, x, zero);
            let num = k.vsel(neg, e, one);
            k.b.ins().fdiv(num, d)
        })
    }
}
