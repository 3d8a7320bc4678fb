//! Small helpers over `FunctionBuilder` shared by every kernel template:
//! the kernel signature, operand addressing, counted loops and f32x4 access.
//!
//! Every kernel has the signature
//! `fn(arena: *mut u8, ptrs: *const *const u8, start: i64, end: i64) -> i64`:
//! intermediate buffers sit at fixed offsets in the arena, fed tensors are
//! reached through the pointer table, `[start, end)` is the slice of the
//! kernel's work units this call must do, and a non-zero result reports a
//! bad value (see `runtime::RuntimeError`).

use cranelift_codegen::cursor::{Cursor, FuncCursor};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64, I8X16};
use cranelift_codegen::ir::{
    AbiParam, Block, ConstantData, Endianness, Function, Inst, InstBuilder, MemFlagsData,
    Signature, StackSlotData, StackSlotKind, Type, UserFuncName, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use std::sync::OnceLock;

/// Where a kernel operand lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// A byte offset into the runtime-owned arena.
    Arena(usize),
    /// An entry of the pointer table (a tensor fed by the caller).
    Extern(usize),
}

/// The signature every kernel function has.
pub fn kernel_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    for _ in 0..4 {
        sig.params.push(AbiParam::new(I64));
    }
    sig.returns.push(AbiParam::new(I64));
    sig
}

/// Plain data access: the runtime guarantees bounds and 4-byte alignment.
pub fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Data that no store of this function can change (packed panels): such
/// loads may move next to their use and fold into the consuming instruction.
pub fn ro_flags() -> MemFlagsData {
    MemFlagsData::trusted().with_readonly().with_can_move()
}

/// How a kernel reaches its operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Offsets and pointer-table slots are constants in the code.
    Baked,
    /// A fifth argument points at a table with one `i64` per operand, in
    /// order of first use (see [`build_kernel_in`]): its arena offset in bytes,
    /// or for a fed tensor its byte offset in the pointer table. Kernels
    /// that differ only in where their buffers are then have identical code.
    Table,
}

/// A kernel under construction.
pub struct Kb<'a> {
    pub b: FunctionBuilder<'a>,
    arena: Value,
    ptrs: Value,
    table: Option<Value>,
    pub start: Value,
    pub end: Value,
    ret: Block,
    /// The entry block's jump to the body: operand base addresses are
    /// computed just before it, once, whatever loop first asks for them.
    entry_jump: Inst,
    bases: Vec<(Loc, Value)>,
    /// Address of the math constant table, once asked for.
    consts: Option<Value>,
}

/// Build one kernel function; `body` emits the work for `[start, end)` and
/// returns when done (the helper adds the successful return).
pub fn build_kernel(
    config: TargetFrontendConfig,
    index: u32,
    body: impl FnOnce(&mut Kb),
) -> Function {
    let mut ctx = FunctionBuilderContext::new();
    build_kernel_in(&mut ctx, config, index, Addressing::Baked, body).0
}

/// The signature of a kernel built with `addressing`.
pub fn signature_for(call_conv: CallConv, addressing: Addressing) -> Signature {
    let mut sig = kernel_signature(call_conv);
    if addressing == Addressing::Table {
        sig.params.push(AbiParam::new(I64));
    }
    sig
}

/// [`build_kernel`] reusing the builder's scratch memory across functions;
/// also returns the operands in the order the table of
/// [`Addressing::Table`] lists them.
pub fn build_kernel_in(
    ctx: &mut FunctionBuilderContext,
    config: TargetFrontendConfig,
    index: u32,
    addressing: Addressing,
    body: impl FnOnce(&mut Kb),
) -> (Function, Vec<Loc>) {
    let mut func = Function::with_name_signature(
        UserFuncName::user(0, index),
        signature_for(config.default_call_conv, addressing),
    );
    let operands;
    {
        let mut b = FunctionBuilder::new(&mut func, ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let top = b.create_block();
        let entry_jump = b.ins().jump(top, &[]);
        b.switch_to_block(top);
        let ret = b.create_block();
        b.append_block_param(ret, I64);
        let mut kb = Kb {
            b,
            arena: p[0],
            ptrs: p[1],
            table: p.get(4).copied(),
            start: p[2],
            end: p[3],
            ret,
            entry_jump,
            bases: Vec::new(),
            consts: None,
        };
        body(&mut kb);
        let zero = kb.iconst(0);
        kb.jump_ret(zero);
        kb.b.switch_to_block(ret);
        let code = kb.b.block_params(ret)[0];
        kb.b.ins().return_(&[code]);
        kb.b.seal_all_blocks();
        operands = kb.bases.iter().map(|(l, _)| *l).collect();
        kb.b.finalize(config);
    }
    (func, operands)
}

/// The table entry of an operand under [`Addressing::Table`].
pub fn table_entry(loc: Loc) -> i64 {
    match loc {
        Loc::Arena(off) => off as i64,
        Loc::Extern(slot) => (slot * 8) as i64,
    }
}

impl Kb<'_> {
    pub fn iconst(&mut self, v: i64) -> Value {
        self.b.ins().iconst(I64, v)
    }

    pub fn fconst(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }

    pub fn vconst(&mut self, v: f32) -> Value {
        let s = self.fconst(v);
        self.b.ins().splat(F32X4, s)
    }

    /// Leave the kernel with `code` (0 = success); code after this point in
    /// the current block is unreachable, so a fresh block is opened.
    pub fn jump_ret(&mut self, code: Value) {
        self.b
            .ins()
            .jump(self.ret, &[cranelift_codegen::ir::BlockArg::Value(code)]);
        let next = self.b.create_block();
        self.b.switch_to_block(next);
    }

    /// Base address of an operand, computed once in the entry block.
    pub fn base(&mut self, loc: Loc) -> Value {
        if let Some((_, v)) = self.bases.iter().find(|(l, _)| *l == loc) {
            return *v;
        }
        let k = (self.bases.len() * 8) as i32;
        let (arena, ptrs) = (self.arena, self.ptrs);
        let mut pos = FuncCursor::new(self.b.func).at_inst(self.entry_jump);
        let v = match (self.table, loc) {
            (None, Loc::Arena(off)) => pos.ins().iadd_imm_s(arena, off as i64),
            (None, Loc::Extern(slot)) => pos.ins().load(I64, ro_flags(), ptrs, (slot * 8) as i32),
            (Some(table), Loc::Arena(_)) => {
                let off = pos.ins().load(I64, ro_flags(), table, k);
                pos.ins().iadd(arena, off)
            }
            (Some(table), Loc::Extern(_)) => {
                let off = pos.ins().load(I64, ro_flags(), table, k);
                let slot = pos.ins().iadd(ptrs, off);
                pos.ins().load(I64, ro_flags(), slot, 0)
            }
        };
        self.bases.push((loc, v));
        v
    }

    /// The address of the process-lifetime math constant table (every
    /// caller passes the same `addr`), loaded once in the entry block.
    pub fn static_table(&mut self, addr: usize) -> Value {
        if let Some(v) = self.consts {
            return v;
        }
        // Read from a cell rather than used as an immediate: Cranelift
        // rematerialises a constant at every use (a 10-byte `movabs` per
        // folded load), a loaded value stays in one register.
        static CELL: OnceLock<usize> = OnceLock::new();
        let cell = CELL.get_or_init(|| addr) as *const usize;
        let mut pos = FuncCursor::new(self.b.func).at_inst(self.entry_jump);
        let at = pos.ins().iconst(I64, cell as i64);
        let v = pos.ins().load(I64, ro_flags(), at, 0);
        self.consts = Some(v);
        v
    }

    /// `base + idx * scale` (byte address of element `idx`).
    pub fn addr(&mut self, base: Value, idx: Value, scale: i64) -> Value {
        let off = self.b.ins().imul_imm_s(idx, scale);
        self.b.ins().iadd(base, off)
    }

    pub fn load_f(&mut self, addr: Value, off: i32) -> Value {
        self.b.ins().load(F32, flags(), addr, off)
    }
    pub fn store_f(&mut self, v: Value, addr: Value, off: i32) {
        self.b.ins().store(flags(), v, addr, off);
    }
    pub fn load_v(&mut self, addr: Value, off: i32) -> Value {
        self.b.ins().load(F32X4, flags(), addr, off)
    }
    /// A vector of the `n ≤ 4` floats at byte offset `off` of `p`, lane by
    /// lane when fewer than 4 (at the right edge of an unpadded operand;
    /// the other lanes are 0).
    pub fn load_lanes(&mut self, p: Value, off: i32, n: usize) -> Value {
        if n == 4 {
            return self.load_v(p, off);
        }
        let mut v = self.vconst(0.0);
        for l in 0..n {
            let x = self.load_f(p, off + (l * 4) as i32);
            v = self.b.ins().insertlane(v, x, l as u8);
        }
        v
    }
    /// A shuffle of the 32-bit lanes of `a` (lanes `0..4`) and `b`
    /// (`4..8`): lane `i` of the result is lane `lanes[i]` of the pair.
    pub fn shuffle32(&mut self, a: Value, b: Value, lanes: [u8; 4]) -> Value {
        let mut bytes = [0u8; 16];
        for (i, l) in lanes.iter().enumerate() {
            for j in 0..4 {
                bytes[4 * i + j] = 4 * l + j as u8;
            }
        }
        let m = self
            .b
            .func
            .dfg
            .immediates
            .push(ConstantData::from(&bytes[..]));
        let le = MemFlagsData::new().with_endianness(Endianness::Little);
        let a8 = self.b.ins().bitcast(I8X16, le, a);
        let b8 = self.b.ins().bitcast(I8X16, le, b);
        let r = self.b.ins().shuffle(a8, b8, m);
        self.b.ins().bitcast(F32X4, le, r)
    }
    pub fn load_i(&mut self, addr: Value, off: i32) -> Value {
        self.b.ins().load(I32, flags(), addr, off)
    }
    pub fn load_ty(&mut self, ty: Type, addr: Value, off: i32) -> Value {
        self.b.ins().load(ty, flags(), addr, off)
    }

    /// A mutable local.
    pub fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }

    /// The current values of a grid of variables (a tile's accumulators).
    pub fn use_vars(&mut self, vars: &[Vec<Variable>]) -> Vec<Vec<Value>> {
        vars.iter()
            .map(|row| row.iter().map(|&v| self.b.use_var(v)).collect())
            .collect()
    }

    /// Defines a grid of variables from values of the same shape.
    pub fn def_vars(&mut self, vars: &[Vec<Variable>], vals: &[Vec<Value>]) {
        for (row, vals) in vars.iter().zip(vals) {
            for (&v, &x) in row.iter().zip(vals) {
                self.b.def_var(v, x);
            }
        }
    }

    /// `for i in (lo..hi).step_by(step)`; `body` gets `i`.
    pub fn for_range(
        &mut self,
        lo: Value,
        hi: Value,
        step: i64,
        body: impl FnOnce(&mut Self, Value),
    ) {
        let hdr = self.b.create_block();
        let bb = self.b.create_block();
        let exit = self.b.create_block();
        let iv = self.var(I64, lo);
        self.b.ins().jump(hdr, &[]);
        self.b.switch_to_block(hdr);
        let i = self.b.use_var(iv);
        // `i + step <= hi` keeps stepped loops to whole steps.
        let cond = if step == 1 {
            self.b.ins().icmp(IntCC::SignedLessThan, i, hi)
        } else {
            let last = self.b.ins().iadd_imm_s(i, step);
            self.b.ins().icmp(IntCC::SignedLessThanOrEqual, last, hi)
        };
        self.b.ins().brif(cond, bb, &[], exit, &[]);
        self.b.switch_to_block(bb);
        body(self, i);
        let i = self.b.use_var(iv);
        let next = self.b.ins().iadd_imm_s(i, step);
        self.b.def_var(iv, next);
        self.b.ins().jump(hdr, &[]);
        self.b.switch_to_block(exit);
    }

    /// `for i in lo..hi` over constants.
    pub fn for_const(&mut self, lo: usize, hi: usize, body: impl FnOnce(&mut Self, Value)) {
        let lo = self.iconst(lo as i64);
        let hi = self.iconst(hi as i64);
        self.for_range(lo, hi, 1, body);
    }

    /// Loop over `[lo, hi)` with f32x4 steps, then the scalar tail.
    pub fn for_vec_tail(
        &mut self,
        lo: Value,
        hi: Value,
        vec_body: impl FnMut(&mut Self, Value),
        mut tail_body: impl FnMut(&mut Self, Value),
    ) {
        let from = self.for_blocks(lo, hi, 4, vec_body);
        self.for_range(from, hi, 1, |k, j| tail_body(k, j));
    }

    /// A long sum in blocks: `body(k, lo, hi)` adds the terms `lo..hi` to
    /// the running sums `accs`, called for `0..n` in blocks of `block`,
    /// each block's sums starting from `zero` and then added to totals in
    /// order; the totals end in `accs`, which hold `zero` on entry. No
    /// running sum then adds more than one block's terms (one per lane over
    /// a 40,000-term row drifted by 4.5e-5). Up to `block` terms, one call
    /// over `0..n`, as without it.
    pub fn sum_in_blocks(
        &mut self,
        n: usize,
        block: usize,
        (accs, zero): (&[Variable], Value),
        body: impl Fn(&mut Self, Value, Value),
    ) {
        if n <= block {
            let (lo, hi) = (self.iconst(0), self.iconst(n as i64));
            return body(self, lo, hi);
        }
        let totals: Vec<Variable> = accs.iter().map(|_| self.var_like(zero)).collect();
        let run = |k: &mut Self, lo: Value, hi: Value| {
            for &acc in accs {
                k.b.def_var(acc, zero);
            }
            body(k, lo, hi);
            for (&acc, &total) in accs.iter().zip(&totals) {
                let (a, t) = (k.b.use_var(acc), k.b.use_var(total));
                let sum = k.b.ins().fadd(t, a);
                k.b.def_var(total, sum);
            }
        };
        let (zero_i, whole) = (self.iconst(0), self.iconst((n / block) as i64));
        self.for_range(zero_i, whole, 1, |k, b| {
            let lo = k.b.ins().imul_imm_s(b, block as i64);
            let hi = k.b.ins().iadd_imm_s(lo, block as i64);
            run(k, lo, hi);
        });
        if !n.is_multiple_of(block) {
            let lo = self.iconst((n / block * block) as i64);
            let hi = self.iconst(n as i64);
            run(self, lo, hi);
        }
        for (&acc, &total) in accs.iter().zip(&totals) {
            let t = self.b.use_var(total);
            self.b.def_var(acc, t);
        }
    }

    /// `[0, 1, 2, 3]`: the index of each i32 lane.
    pub fn lane_indices(&mut self) -> Value {
        let zero = self.b.ins().iconst(I32, 0);
        let mut v = self.b.ins().splat(I32X4, zero);
        for l in 1..4u8 {
            let x = self.b.ins().iconst(I32, l as i64);
            v = self.b.ins().insertlane(v, x, l);
        }
        v
    }

    /// An i64 index in every i32 lane.
    pub fn splat_i32(&mut self, x: Value) -> Value {
        let x = self.b.ins().ireduce(I32, x);
        self.b.ins().splat(I32X4, x)
    }

    /// A variable of `init`'s type, set to it.
    fn var_like(&mut self, init: Value) -> Variable {
        let ty = self.b.func.dfg.value_type(init);
        self.var(ty, init)
    }

    /// `for i in (lo..).step_by(width)` while a whole block `i..i + width`
    /// fits below `hi`; returns the first index no block covered.
    pub fn for_blocks(
        &mut self,
        lo: Value,
        hi: Value,
        width: i64,
        mut body: impl FnMut(&mut Self, Value),
    ) -> Value {
        let iv = self.var(I64, lo);
        let hdr = self.b.create_block();
        let bb = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().jump(hdr, &[]);
        self.b.switch_to_block(hdr);
        let i = self.b.use_var(iv);
        let last = self.b.ins().iadd_imm_s(i, width);
        let cond = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, last, hi);
        self.b.ins().brif(cond, bb, &[], done, &[]);
        self.b.switch_to_block(bb);
        body(self, i);
        let i = self.b.use_var(iv);
        let next = self.b.ins().iadd_imm_s(i, width);
        self.b.def_var(iv, next);
        self.b.ins().jump(hdr, &[]);
        self.b.switch_to_block(done);
        self.b.use_var(iv)
    }

    /// `if cond { then }`.
    pub fn if_then(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        let tb = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().brif(cond, tb, &[], done, &[]);
        self.b.switch_to_block(tb);
        then(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
    }

    /// `if cond { then } else { els }`.
    pub fn if_else(
        &mut self,
        cond: Value,
        then: impl FnOnce(&mut Self),
        els: impl FnOnce(&mut Self),
    ) {
        let tb = self.b.create_block();
        let eb = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().brif(cond, tb, &[], eb, &[]);
        self.b.switch_to_block(tb);
        then(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(eb);
        els(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
    }

    /// A 16-byte-aligned stack buffer of `bytes`; returns its address.
    pub fn stack_buf(&mut self, bytes: u32) -> Value {
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            bytes,
            4,
        ));
        self.b.ins().stack_addr(I64, slot, 0)
    }

    /// `(x / d, x % d)` for a constant `d`. Steps compiled without the
    /// optimiser would get a `div` (tens of cycles) per call; a power of
    /// two is a shift and a mask, and when `x < 2^32` (`small`) the
    /// quotient is the high half of `x · ⌈2^64 / d⌉`: the error term
    /// `x · e / 2^64` (e < 1) stays below 2^-32 ≤ 1/d, too little to carry
    /// `x / d` past its next integer.
    pub fn udiv_rem_const(&mut self, x: Value, d: u64, small: bool) -> (Value, Value) {
        if d <= 1 {
            return (x, self.iconst(0));
        }
        if d.is_power_of_two() {
            let q = self.b.ins().ushr_imm_u(x, d.trailing_zeros() as i64);
            let r = self.b.ins().band_imm_s(x, d as i64 - 1);
            return (q, r);
        }
        let q = if small && d <= 1 << 32 {
            let m = self.iconst(reciprocal(d) as i64);
            self.b.ins().umulhi(x, m)
        } else {
            self.b.ins().udiv_imm_u(x, d as i64)
        };
        let qd = self.b.ins().imul_imm_s(q, d as i64);
        let r = self.b.ins().isub(x, qd);
        (q, r)
    }

    /// Decompose a flat index into its coordinates over `dims` (row-major)
    /// and return `Σ coord_d · strides[k][d]` for each stride vector `k`.
    pub fn unflatten_offsets(
        &mut self,
        flat: Value,
        dims: &[usize],
        strides: &[Vec<i64>],
    ) -> Vec<Value> {
        let mut offs: Vec<Value> = strides.iter().map(|_| self.iconst(0)).collect();
        let mut rest = flat;
        // Flat indices stay below the product of the dims.
        let small = dims
            .iter()
            .try_fold(1u64, |p, &d| p.checked_mul(d as u64))
            .is_some_and(|p| p <= 1 << 32);
        for d in (0..dims.len()).rev() {
            let n = dims[d] as u64;
            let coord = if d == 0 {
                rest
            } else {
                let (q, c) = self.udiv_rem_const(rest, n, small);
                rest = q;
                c
            };
            for (k, s) in strides.iter().enumerate() {
                if s[d] != 0 {
                    let t = self.b.ins().imul_imm_s(coord, s[d]);
                    offs[k] = self.b.ins().iadd(offs[k], t);
                }
            }
        }
        offs
    }
}
/// `⌈2^64 / d⌉` for `d` ≥ 2 no power of two: the multiplier whose product
/// with `x < 2^32` has `x / d` as its high half (see `Kb::udiv_rem_const`).
fn reciprocal(d: u64) -> u64 {
    u64::MAX / d + 1
}

/// `0..n`, backwards when `reverse`: the order in which a micro-kernel
/// step visits its rows and columns. Steps alternate direction so that
/// each accumulator returns to its register every two steps (see
/// `matmul::micro_kernel`).
pub fn step_order(n: usize, reverse: bool) -> Vec<usize> {
    if reverse {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::reciprocal;

    /// The high half of `x · reciprocal(d)` is `x / d` for every `x < 2^32`
    /// tried: both ends, multiples of `d` and their neighbours.
    #[test]
    fn reciprocal_multiplication_divides_32_bit_indices() {
        let mut ds: Vec<u64> = (3..3000).filter(|d: &u64| !d.is_power_of_two()).collect();
        ds.extend([1_000_003, (1 << 31) + 1, (1 << 32) - 1]);
        for d in ds {
            let m = reciprocal(d) as u128;
            let top = (1u64 << 32) - 1;
            let mut xs = vec![
                0,
                1,
                d - 1,
                d,
                d + 1,
                top,
                top - 1,
                top - top % d,
                top - top % d - 1,
            ];
            xs.extend((1..200u64).map(|i| (i * 2_654_435_761) % (1 << 32)));
            for x in xs {
                let q = ((x as u128 * m) >> 64) as u64;
                assert_eq!(q, x / d, "{x} / {d}");
            }
        }
    }
}
