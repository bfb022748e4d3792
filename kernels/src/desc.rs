//! What a launcher knows about an operand before it launches: element type, shape, row stride
//! and address ([`MatDesc`]), and the checks every launcher shares (shapes, `int` limits,
//! alignment, overlap). Pure Rust, so the launchers' validation is tested without a GPU.

use crate::error::{shape_err, Result};

/// Element type of device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16: activations and dequantised weights.
    Bf16,
    /// f32: parameter vectors (norm weights, QKNorm scales), RoPE tables, score matrices.
    F32,
    /// float8 e4m3fn weights (kept fp8 on the GPU, with a per-tensor scale).
    F8E4M3,
    /// float8 e5m2 weights.
    F8E5M2,
    /// int32: token ids.
    I32,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
            DType::I32 => "i32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A row-major matrix in device memory: `rows × cols` elements of `dtype`, row `r` starting
/// `r·ld` elements after `addr`. A device vector is `[1, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatDesc {
    pub addr: u64,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub dtype: DType,
}

impl MatDesc {
    /// Elements from the first to one past the last: `(rows − 1)·ld + cols` (0 when empty).
    pub fn span_elems(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.ld + self.cols
        }
    }

    /// Bytes from the first element to one past the last.
    pub fn span_bytes(&self) -> usize {
        self.span_elems() * self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }

    /// `[rows, cols] dtype (ld N)` for messages.
    pub fn show(&self) -> String {
        if self.ld == self.cols {
            format!("[{}, {}] {}", self.rows, self.cols, self.dtype)
        } else {
            format!(
                "[{}, {}] {} (row stride {})",
                self.rows, self.cols, self.dtype, self.ld
            )
        }
    }

    /// Whether the two operands share at least one element. Exact for two views with the same
    /// row stride and element size (column ranges of one buffer, like q, k and v of a fused qkv,
    /// do not overlap even though their byte ranges interleave); otherwise conservative (any
    /// shared byte range counts).
    pub fn overlaps(&self, other: &MatDesc) -> bool {
        if self.is_empty() || other.is_empty() {
            return false;
        }
        let (a0, a1) = (self.addr, self.addr + self.span_bytes() as u64);
        let (b0, b1) = (other.addr, other.addr + other.span_bytes() as u64);
        if a1 <= b0 || b1 <= a0 {
            return false;
        }
        let size = self.dtype.size() as u64;
        if self.ld != other.ld || size != other.dtype.size() as u64 {
            return true;
        }
        // Put the lower address first; express the other's origin in its (row, column) frame.
        let (lo, hi) = if self.addr <= other.addr {
            (self, other)
        } else {
            (other, self)
        };
        let diff = hi.addr - lo.addr;
        if diff % size != 0 {
            return true;
        }
        let ld = lo.ld as u64;
        let d = diff / size;
        let (dr, dc) = ((d / ld) as usize, (d % ld) as usize);
        if dc + hi.cols > lo.ld {
            return true; // `hi`'s rows wrap into the next row of `lo`: be conservative
        }
        let rows_meet = dr < lo.rows; // hi covers lo's rows [dr, dr + hi.rows)
        let cols_meet = dc < lo.cols; // hi covers lo's columns [dc, dc + hi.cols), lo covers [0, lo.cols)
        rows_meet && cols_meet
    }
}

/// Checks that `m` has element type `dtype`.
pub fn expect_dtype(op: &'static str, what: &str, m: &MatDesc, dtype: DType) -> Result<()> {
    if m.dtype != dtype {
        return Err(shape_err(
            op,
            format!("{what} is {}, expected {dtype}", m.show()),
        ));
    }
    Ok(())
}

/// Checks that `m` is `[rows, cols]`.
pub fn expect_shape(
    op: &'static str,
    what: &str,
    m: &MatDesc,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if (m.rows, m.cols) != (rows, cols) {
        return Err(shape_err(
            op,
            format!("{what} is {}, expected [{rows}, {cols}]", m.show()),
        ));
    }
    Ok(())
}

/// Checks that `m` is a row vector `[1, n]`.
pub fn expect_vector(op: &'static str, what: &str, m: &MatDesc, n: usize) -> Result<()> {
    expect_shape(op, what, m, 1, n)
}

/// Checks that the output `out` shares no element with `input`.
pub fn expect_disjoint(op: &'static str, out: &MatDesc, what: &str, input: &MatDesc) -> Result<()> {
    if out.overlaps(input) {
        return Err(shape_err(
            op,
            format!(
                "the output {} overlaps the input {what} {}",
                out.show(),
                input.show()
            ),
        ));
    }
    Ok(())
}

/// Checks that `out` either is exactly `input` (an in-place elementwise op) or shares nothing
/// with it.
pub fn expect_same_or_disjoint(
    op: &'static str,
    out: &MatDesc,
    what: &str,
    input: &MatDesc,
) -> Result<()> {
    if out == input {
        return Ok(());
    }
    expect_disjoint(op, out, what, input)
}

/// Checks the basic invariants of one operand: `ld ≥ cols`, aligned to its element size, and
/// each dimension and the row stride within a kernel's `int` arguments.
pub fn expect_valid(op: &'static str, what: &str, m: &MatDesc) -> Result<()> {
    if m.rows > 1 && m.ld < m.cols {
        return Err(shape_err(
            op,
            format!("{what} {} has a row stride below its width", m.show()),
        ));
    }
    if m.addr % m.dtype.size() as u64 != 0 {
        return Err(shape_err(
            op,
            format!(
                "{what} {} at {:#x} is not aligned to its {}-byte elements",
                m.show(),
                m.addr,
                m.dtype.size()
            ),
        ));
    }
    for (name, v) in [("rows", m.rows), ("cols", m.cols), ("row stride", m.ld)] {
        to_i32(op, name, v)?;
    }
    Ok(())
}

/// `v` as a kernel's `int` argument.
pub fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| shape_err(op, format!("{what} = {v} exceeds a kernel's int range")))
}

/// Blocks for `n` units of work, at most `cap` (kernels loop grid-stride over the rest), at
/// least 1.
pub fn blocks(n: usize, per_block: usize, cap: u32) -> u32 {
    let b = n.div_ceil(per_block.max(1));
    b.clamp(1, cap as usize) as u32
}

/// Largest grid.x the kernels use (grid-stride beyond it).
pub const MAX_GRID_X: u32 = 1 << 20;
/// Largest grid.y (the hardware limit).
pub const MAX_GRID_Y: u32 = 65_535;

/// The launch shape of one kernel: grid, block and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl LaunchDims {
    /// A 1-D block of `threads`.
    pub fn new(grid: (u32, u32, u32), threads: u32) -> LaunchDims {
        LaunchDims {
            grid,
            block: (threads, 1, 1),
        }
    }

    /// cudarc's launch configuration (no dynamic shared memory: every kernel's shared memory is
    /// static).
    pub fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: self.grid,
            block_dim: self.block,
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A bf16 view at `addr` (bytes) for tests.
    pub fn bf(addr: u64, rows: usize, cols: usize, ld: usize) -> MatDesc {
        MatDesc {
            addr,
            rows,
            cols,
            ld,
            dtype: DType::Bf16,
        }
    }

    /// A contiguous f32 vector `[1, n]`.
    pub fn f32v(addr: u64, n: usize) -> MatDesc {
        MatDesc {
            addr,
            rows: 1,
            cols: n,
            ld: n,
            dtype: DType::F32,
        }
    }

    #[test]
    fn column_ranges_of_one_buffer_do_not_overlap() {
        // qkv [10, 96] bf16 at 0x1000: q = columns [0, 32), k = [32, 64), v = [64, 96).
        let q = bf(0x1000, 10, 32, 96);
        let k = bf(0x1000 + 64, 10, 32, 96);
        let v = bf(0x1000 + 128, 10, 32, 96);
        assert!(!q.overlaps(&k) && !k.overlaps(&q) && !k.overlaps(&v) && !q.overlaps(&v));
        // Columns [16, 48) meet both q and k.
        let mid = bf(0x1000 + 32, 10, 32, 96);
        assert!(mid.overlaps(&q) && mid.overlaps(&k) && q.overlaps(&mid));
        assert!(q.overlaps(&q));
    }

    #[test]
    fn row_ranges_overlap_exactly() {
        let top = bf(0, 4, 8, 8);
        let bottom = bf(4 * 8 * 2, 4, 8, 8);
        assert!(!top.overlaps(&bottom) && !bottom.overlaps(&top));
        let straddle = bf(3 * 8 * 2, 2, 8, 8);
        assert!(straddle.overlaps(&top) && straddle.overlaps(&bottom));
        // Rows past the end of a short view do not meet it.
        let one_row = bf(0, 1, 8, 8);
        assert!(!one_row.overlaps(&bf(16, 1, 8, 8)));
    }

    #[test]
    fn different_strides_are_conservative() {
        let a = bf(0, 4, 4, 16);
        let b = bf(8, 4, 4, 4); // bytes [8, 40): inside a's byte range
        assert!(a.overlaps(&b));
        let far = bf(1 << 20, 4, 4, 4);
        assert!(!a.overlaps(&far));
    }

    #[test]
    fn empty_views_overlap_nothing() {
        let a = bf(0, 0, 8, 8);
        assert!(!a.overlaps(&bf(0, 4, 8, 8)));
    }

    #[test]
    fn valid_checks_alignment_stride_and_int_range() {
        assert!(expect_valid("t", "x", &bf(0x10, 4, 8, 8)).is_ok());
        assert!(expect_valid("t", "x", &bf(0x11, 4, 8, 8)).is_err());
        assert!(expect_valid("t", "x", &bf(0x10, 4, 8, 4)).is_err());
        assert!(expect_valid("t", "x", &bf(0x10, 1, 8, 4)).is_ok()); // one row: stride unused
        assert!(expect_valid("t", "x", &bf(0, 1, 1 << 31, 1 << 31)).is_err());
    }

    #[test]
    fn same_or_disjoint() {
        let a = bf(0, 4, 8, 8);
        assert!(expect_same_or_disjoint("t", &a, "x", &a).is_ok());
        assert!(expect_same_or_disjoint("t", &bf(16, 4, 8, 8), "x", &a).is_err());
        assert!(expect_same_or_disjoint("t", &bf(1024, 4, 8, 8), "x", &a).is_ok());
    }

    #[test]
    fn block_counts() {
        assert_eq!(blocks(0, 256, 100), 1);
        assert_eq!(blocks(257, 256, 100), 2);
        assert_eq!(blocks(1 << 30, 1, 65_535), 65_535);
    }
}
