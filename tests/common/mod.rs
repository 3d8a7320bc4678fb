//! Helpers shared by the JIT test crates.

/// Finds the block of `asm` with `fmas` FMAs (a micro-kernel's unrolled
/// loop body) and checks its broadcasts and register moves: the copies
/// the FMA form needs and no more (no accumulator moved on the loop edge),
/// and no stack access (no spills).
pub fn check_fma_loop(asm: &str, fmas: usize, broadcasts: usize, moves: usize) {
    let body = asm
        .split("\nblock")
        .find(|b| b.matches("vfmadd").count() == fmas)
        .unwrap_or_else(|| panic!("no block with {fmas} FMAs in:\n{asm}"));
    // The disassembly of the next function follows the last block.
    let body = body.split("\n;").next().unwrap_or(body);
    let moved = body.matches("movdqa").count() + body.matches("movaps").count();
    assert_eq!(
        body.matches("vbroadcastss").count(),
        broadcasts,
        "broadcasts:\n{body}"
    );
    assert_eq!(moved, moves, "register moves:\n{body}");
    assert!(!body.contains("rsp"), "spills in the loop:\n{body}");
}
