//! Stream capture and CUDA graphs on the emulated driver: a captured step is recorded, not run,
//! and every replay runs it again with the parameter values of the capture; the calls the real
//! driver refuses during a global-mode capture are refused with its error codes and invalidate
//! the capture; a cuBLASLt GEMM captured through the production wrapper replays bit for bit;
//! the production graph type ([`kontext_kernels::graph::Graph`]) reports a refused call.

use super::harness::{arg, buffer, compile, control, function, gpu, read, serial};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, DriverError};
use kontext_kernels::gemm::Gemm;
use kontext_kernels::{DType, KernelError};

const KERNELS: &str = r#"
#include "common.cuh"

extern "C" __global__ void add_to(int* x, int by, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += by;
}
"#;

const N: usize = 100;

/// Queues `add_to(x, by, N)` on the GPU's stream (not synchronised: it may be captured).
fn add_to(f: &cudarc::driver::CudaFunction, x: u64, by: i32) -> Result<(), DriverError> {
    let n = N as i32;
    let mut params = [arg(&x), arg(&by), arg(&n)];
    // SAFETY: add_to(int*, int, int) with x holding N ints; the parameter array is read by the
    // driver during the call (a capture copies the values).
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (1, 1, 1),
            (128, 1, 1),
            0,
            gpu().stream().cu_stream(),
            &mut params,
        )
    }
}

fn code(r: Result<(), DriverError>) -> Option<CUresult> {
    r.err().map(|e| e.0)
}

#[test]
#[ignore = "needs the emulated GPU (scripts/emulated)"]
fn a_graph_replays_its_launches_with_the_parameter_values_of_the_capture() {
    let _s = serial();
    let g = gpu();
    let m = compile("graph_kernels", KERNELS).expect("compiles");
    let f = function(&m, "add_to");
    let x = buffer(&[0i32; N]);
    let y = buffer(&[0i32; N]);
    let z = buffer(&[0i32; N]);
    let before = control::launches("add_to");
    let graph = g
        .capture(|| -> Result<(), KernelError> {
            let mut by = 3;
            add_to(&f, x.ptr(), by).map_err(|e| KernelError::Driver {
                op: "add_to".into(),
                msg: format!("{e:?}"),
            })?;
            // The node holds the value 3: the argument's storage changing later must not matter.
            by = 1000;
            std::hint::black_box(by);
            // SAFETY: x and y hold N ints each; z N ints for the memset.
            unsafe {
                result::memcpy_dtod_async(y.ptr(), x.ptr(), N * 4, g.stream().cu_stream())
                    .expect("cuMemcpyDtoDAsync");
                sys::cuMemsetD32Async(z.ptr(), 7, N, g.stream().cu_stream())
                    .result()
                    .expect("cuMemsetD32Async");
            }
            Ok(())
        })
        .expect("captures");
    assert_eq!(graph.nodes(), 3, "a kernel, a copy and a memset");
    assert_eq!(read::<i32>(&x), vec![0; N], "a capture runs nothing");
    assert_eq!(read::<i32>(&z), vec![0; N], "a capture runs nothing");
    assert_eq!(
        control::launches("add_to"),
        before,
        "a capture executes no kernel"
    );
    for i in 1..=5 {
        graph.launch().expect("cuGraphLaunch");
        g.synchronize().expect("sync");
        assert_eq!(
            read::<i32>(&x),
            vec![3 * i; N],
            "replay {i}: x += 3 once per replay"
        );
        assert_eq!(
            read::<i32>(&y),
            vec![3 * i; N],
            "replay {i}: the copy after the kernel"
        );
        assert_eq!(read::<i32>(&z), vec![7; N], "replay {i}: the memset");
    }
    assert_eq!(control::launches("add_to"), before + 5, "five executions");
}

#[test]
#[ignore = "needs the emulated GPU (scripts/emulated)"]
fn a_captured_copy_from_page_locked_memory_reads_it_at_replay() {
    let _s = serial();
    let g = gpu();
    let x = buffer(&[0u8; 64]);
    let mut pinned = g.alloc_pinned(64).expect("cuMemHostAlloc");
    pinned.as_mut_slice().fill(1);
    let graph = g
        .capture(|| -> Result<(), KernelError> {
            // SAFETY: 64 page-locked bytes to a 64-byte allocation, alive for every replay.
            unsafe { result::memcpy_htod_async(x.ptr(), pinned.as_slice(), g.stream().cu_stream()) }
                .map_err(|e| KernelError::Driver {
                    op: "cuMemcpyHtoDAsync".into(),
                    msg: format!("{e:?}"),
                })
        })
        .expect("a copy from page-locked memory is captured");
    pinned.as_mut_slice().fill(9);
    graph.launch().expect("replay");
    g.synchronize().expect("sync");
    assert_eq!(
        read::<u8>(&x),
        vec![9; 64],
        "the copy reads the host memory when it runs"
    );
}

#[test]
#[ignore = "needs the emulated GPU (scripts/emulated)"]
fn the_capture_refuses_what_the_driver_refuses_and_is_invalidated() {
    let _s = serial();
    let g = gpu();
    let s = g.stream().clone();
    let cs = s.cu_stream();
    let m = compile("graph_kernels", KERNELS).expect("compiles");
    let f = function(&m, "add_to");
    let x = buffer(&[0i32; N]);
    let spare = buffer(&[0u8; 256]);
    let outside = g.context().new_event(None).expect("event");
    outside.record(&s).expect("record outside the capture");
    let captured = g.context().new_event(None).expect("event");
    use CUresult::*;
    type Case<'a> = (
        &'a str,
        Box<dyn Fn() -> Result<(), DriverError> + 'a>,
        CUresult,
    );
    let cases: Vec<Case> = vec![
        (
            "cuStreamSynchronize of the capturing stream",
            Box::new(|| s.synchronize()),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "cuStreamQuery of the capturing stream",
            // SAFETY: a live stream.
            Box::new(|| unsafe { sys::cuStreamQuery(cs) }.result()),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "cuCtxSynchronize",
            Box::new(result::ctx::synchronize),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "cuMemAlloc",
            // SAFETY: a plain allocation (refused; freed if it were not).
            Box::new(|| unsafe { result::malloc_sync(256).and_then(|p| result::free_sync(p)) }),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "cuMemFree",
            // SAFETY: refused, so `spare` stays allocated (and is freed by its drop).
            Box::new(|| unsafe { result::free_sync(spare.ptr()) }),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "a synchronous cuMemcpyHtoD",
            // SAFETY: 16 bytes into a 400-byte allocation.
            Box::new(|| unsafe { result::memcpy_htod_sync(x.ptr(), &[0i32; 4]) }),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "a cuMemcpyHtoDAsync from pageable memory",
            // SAFETY: as above; the host buffer outlives the (refused) call.
            Box::new(|| unsafe { result::memcpy_htod_async(x.ptr(), &[0i32; 4], cs) }),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "a cuMemcpyDtoHAsync to pageable memory (a download)",
            Box::new(|| {
                let mut out = [0i32; 4];
                // SAFETY: 16 bytes out of a 400-byte allocation.
                unsafe { result::memcpy_dtoh_async(&mut out, x.ptr(), cs) }
            }),
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        ),
        (
            "cuEventQuery of an event recorded in the capture",
            Box::new(|| {
                captured.record(&s)?;
                // SAFETY: a live event.
                unsafe { result::event::query(captured.cu_event()) }
            }),
            CUDA_ERROR_CAPTURED_EVENT,
        ),
        (
            "cuEventSynchronize of an event recorded in the capture",
            Box::new(|| {
                captured.record(&s)?;
                captured.synchronize()
            }),
            CUDA_ERROR_CAPTURED_EVENT,
        ),
        (
            "cuStreamWaitEvent on an event recorded outside the capture",
            Box::new(|| s.wait(&outside)),
            CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
        ),
        (
            "a launch after a refused call",
            Box::new(|| {
                let _ = s.synchronize();
                add_to(&f, x.ptr(), 1)
            }),
            CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
        ),
    ];
    for (what, call, want) in &cases {
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
            .expect("begin");
        let got = code(call());
        let message = control::last_error();
        let end = s.end_capture(sys::CUgraphInstantiate_flags(0));
        assert_eq!(got, Some(*want), "{what}: {message}");
        assert!(
            message.contains("capture"),
            "{what}: the message names the capture: {message}"
        );
        assert_eq!(
            end.err().map(|e| e.0),
            Some(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
            "{what}: the capture ends in error"
        );
        s.synchronize()
            .expect("the stream works again after the capture");
    }
    // Allowed in a capture: in-stream order through an event of the same capture.
    s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
        .expect("begin");
    captured.record(&s).expect("record in the capture");
    s.wait(&captured)
        .expect("a wait on an event of the same capture");
    assert!(s.end_capture(sys::CUgraphInstantiate_flags(0)).is_ok());
    // Ending a capture that was never begun.
    // SAFETY: a live stream; the graph out-parameter is written only on success.
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    assert_eq!(
        unsafe { sys::cuStreamEndCapture(cs, &mut graph) },
        CUDA_ERROR_STREAM_CAPTURE_UNMATCHED
    );
    // Outside a capture all of it works.
    // SAFETY: 16 bytes into a 400-byte allocation.
    unsafe { result::memcpy_htod_sync(x.ptr(), &[0i32; 4]) }.expect("not capturing");
    result::ctx::synchronize().expect("not capturing");
}

#[test]
#[ignore = "needs the emulated GPU (scripts/emulated)"]
fn a_body_that_reads_back_fails_with_the_drivers_refusal() {
    let _s = serial();
    let g = gpu();
    let m = g.alloc_mat(DType::F32, 2, 3).expect("alloc");
    g.write_f32(&m, &[1.0; 6]).expect("write");
    let err = g
        .capture(|| g.read_f32(&m).map(drop))
        .expect_err("a download inside a capture is refused");
    let text = err.to_string();
    assert!(
        text.contains("cuMemcpyDtoHAsync")
            && text.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"),
        "{text}"
    );
    let err = g
        .capture(|| g.alloc(256).map(drop))
        .expect_err("an allocation inside a capture is refused");
    assert!(
        err.to_string()
            .contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"),
        "{err}"
    );
    assert_eq!(g.read_f32(&m).expect("usable again"), vec![1.0; 6]);
    assert!(!g.is_capturing());
}

#[test]
#[ignore = "needs the emulated GPU (scripts/emulated)"]
fn a_captured_gemm_replays_bit_for_bit_what_it_computes_eagerly() {
    let _s = serial();
    let g = gpu();
    let gemm = Gemm::new(&g).expect("cuBLASLt");
    // An odd shape: 37 × 29 · (23 × 29)ᵀ + bias.
    let (m, k, n) = (37, 29, 23);
    let x = g
        .upload_bf16(&super::harness::random(m * k, 11), m, k)
        .expect("x");
    let w = g
        .upload_bf16(&super::harness::random(n * k, 12), n, k)
        .expect("w");
    let bias = g
        .upload_bf16(&super::harness::random(n, 13), 1, n)
        .expect("bias");
    let eager = g.alloc_mat(DType::Bf16, m, n).expect("y");
    let replayed = g.alloc_mat(DType::Bf16, m, n).expect("y");
    gemm.linear(&x, &w, Some(&bias), &eager)
        .expect("eager GEMM");
    let want = g.read_bytes(&eager).expect("read");
    g.fill_bytes(&replayed, 0xFF).expect("poison");
    let before = control::launches("cublasLtMatmul");
    let graph = g
        .capture(|| gemm.linear(&x, &w, Some(&bias), &replayed))
        .expect("captures the GEMM");
    assert_eq!(graph.nodes(), 1);
    assert_eq!(
        control::launches("cublasLtMatmul"),
        before,
        "captured, not run"
    );
    let poisoned = g.read_bytes(&replayed).expect("read");
    assert!(
        poisoned.iter().all(|&b| b == 0xFF),
        "nothing written at capture"
    );
    for _ in 0..3 {
        g.fill_bytes(&replayed, 0xFF).expect("poison");
        graph.launch().expect("replay");
        assert_eq!(g.read_bytes(&replayed).expect("read"), want, "bit for bit");
    }
    assert_eq!(control::launches("cublasLtMatmul"), before + 3);
}
