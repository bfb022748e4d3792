//! The emulated GPU's own tests (kernels/emu): the device runtime, its detectors with the mutants
//! they catch, the PTX twins, the stand-in cuBLASLt. They run only on the emulated GPU:
//!
//! ```sh
//! scripts/emulated cargo test --release -p kontext-kernels --test emulator -- --ignored
//! ```
//! (`scripts/test` runs exactly that.)

mod emulator {
    mod attention_mma;
    mod attention_wgmma;
    mod detectors;
    mod gemm;
    mod graph;
    pub mod harness;
    mod ptx;
    mod runtime;
}
