//! `Backend::repeat` on the emulated GPU (kernels/emu): a step of backend ops on tensors made
//! before the loop, captured once as a CUDA graph and replayed, gives bit for bit what the eager
//! loop (`KONTEXT_CUDA_GRAPH=0`) gives, and the CPU reference's values within the bf16
//! tolerance; the launch counters show the graph's kernels once per replay; a step that reads
//! back or allocates fails the capture with an error naming it (the emulated driver refuses what
//! the real one refuses). Run by `scripts/test` as
//! `scripts/emulated cargo test --release --test graph_emulated -- --ignored`.

use kontext_engine::backend::cpu::CpuBackend;
use kontext_engine::backend::cuda::CudaBackend;
use kontext_engine::backend::Backend;
use kontext_engine::error::Result;
use kontext_engine::weights::HostWeight;

const L: usize = 7; // rows: not a multiple of any tile
const D: usize = 40;
const TIMES: usize = 5;

fn emulated() {
    assert_eq!(
        std::env::var("KONTEXT_EMULATED").as_deref(),
        Ok("1"),
        "run on the emulated GPU: scripts/emulated cargo test --release --test graph_emulated -- --ignored"
    );
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn weight<B: Backend>(b: &B) -> B::Linear {
    let w = HostWeight {
        shape: vec![D, D],
        data: values(D * D, 2, 1.0 / (D as f32).sqrt()),
    };
    let bias = HostWeight {
        shape: vec![D],
        data: values(D, 3, 0.1),
    };
    b.load_linear("step", w, Some(bias)).expect("weight")
}

/// One step, in place on `x`: x += SiLU(GELU_tanh(x·Wᵀ + b)).
fn step<B: Backend>(b: &B, x: &mut B::Tensor, w: &B::Linear) -> Result<()> {
    let y = b.linear(x, w)?; // [L, D]
    let z = b.gelu_tanh(&y)?; // [L, D]
    let s = b.silu(&z)?; // [L, D]
    b.add_assign(x, &s)
}

/// `x` after TIMES steps through `repeat` (in a planned pool scope, as the denoising loop runs),
/// x read back after every run, and how many times the body was called (2 when captured: the
/// eager warm-up run, then the capture that runs 2 … TIMES replay).
fn run<B: Backend>(b: &B, mut x: B::Tensor, w: &B::Linear) -> (Vec<f32>, Vec<Vec<f32>>, usize) {
    let mut seen = Vec::new();
    let mut calls = 0;
    let xr = std::cell::RefCell::new(&mut x);
    let mut plan = || {
        let mut t = b.upload(&vec![0.0; L * D], L, D)?;
        step(b, &mut t, w)
    };
    b.planned(&mut plan, &mut || {
        b.repeat(
            TIMES,
            &mut || {
                calls += 1;
                step(b, &mut xr.borrow_mut(), w)
            },
            &mut |_| {
                seen.push(b.download(&xr.borrow())?);
                Ok(())
            },
        )
    })
    .expect("repeat");
    (b.download(&x).expect("download"), seen, calls)
}

fn cuda_x(cuda: &CudaBackend) -> kontext_engine::backend::cuda::CudaTensor {
    // bf16 from the start: an f32 x would be replaced by a bf16 copy in the first step, a tensor
    // made inside the body that outlives it, which a graph cannot replay.
    cuda.upload_bf16(&values(L * D, 1, 1.0), L, D).expect("x")
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn counts(cuda: &CudaBackend) -> Vec<(&'static str, u64)> {
    cuda.launch_counts()
}

fn diff(before: &[(&'static str, u64)], after: &[(&'static str, u64)]) -> Vec<(&'static str, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0, a.1 - b.1))
        .collect()
}

/// The tests change the process's environment: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_graphs(on: bool) {
    if on {
        std::env::remove_var("KONTEXT_CUDA_GRAPH");
    } else {
        std::env::set_var("KONTEXT_CUDA_GRAPH", "0");
    }
}

#[test]
#[ignore = "needs the emulated GPU (scripts/emulated)"]
fn a_captured_step_replays_what_the_eager_loop_computes() {
    emulated();
    let _s = serial();
    let cuda = CudaBackend::new(0).expect("the emulated GPU");
    let wc = weight(&cuda);

    set_graphs(true);
    assert!(cuda.graphs_enabled());
    let x = cuda_x(&cuda);
    let before = counts(&cuda);
    let (graph, graph_seen, graph_calls) = run(&cuda, x, &wc);
    let graph_counts = diff(&before, &counts(&cuda));

    set_graphs(false);
    assert!(!cuda.graphs_enabled());
    let x = cuda_x(&cuda);
    let before = counts(&cuda);
    let (eager, eager_seen, eager_calls) = run(&cuda, x, &wc);
    let eager_counts = diff(&before, &counts(&cuda));
    set_graphs(true);

    assert_eq!(graph_calls, 2, "a warm-up run, then captured once");
    assert_eq!(eager_calls, TIMES, "eager: called every run");
    assert_eq!(graph_seen.len(), TIMES, "after() once per run");
    assert_eq!(graph_seen, eager_seen, "every run's x, bit for bit");
    assert_eq!(graph, eager, "bit for bit");
    let moved = rel_l2(&graph_seen[0], &values(L * D, 1, 1.0));
    assert!(moved > 1e-2, "a step changes x (rel {moved})");
    let want: Vec<(&str, u64)> = vec![
        ("gelu_tanh", TIMES as u64),
        ("silu", TIMES as u64),
        ("add_assign", TIMES as u64),
    ];
    let mut got = graph_counts.clone();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted, "each kernel of the graph once per replay");
    assert_eq!(graph_counts, eager_counts, "the eager loop's executions");

    let cpu = CpuBackend;
    let wr = weight(&cpu);
    // The CPU starts from the values the GPU's bf16 x holds.
    let start = cuda.download(&cuda_x(&cuda)).expect("x");
    let (reference, _, _) = run(&cpu, cpu.upload(&start, L, D).expect("x"), &wr);
    let e = rel_l2(&graph, &reference);
    println!("graph vs CPU after {TIMES} steps: rel L2 {e:.2e}");
    assert!(e < 1e-2, "within the bf16 tolerance of the CPU: rel L2 {e}");
}

#[test]
#[ignore = "needs the emulated GPU (scripts/emulated)"]
fn a_step_that_reads_back_or_allocates_fails_the_capture() {
    emulated();
    let _s = serial();
    set_graphs(true);
    let cuda = CudaBackend::new(0).expect("the emulated GPU");
    let w = weight(&cuda);
    let mut x = cuda_x(&cuda);
    let xr = std::cell::RefCell::new(&mut x);
    let mut plan = || {
        let mut t = cuda.upload(&vec![0.0; L * D], L, D)?;
        step(&cuda, &mut t, &w)
    };
    // A host read inside the step.
    let err = cuda
        .planned(&mut plan, &mut || {
            cuda.repeat(
                TIMES,
                &mut || {
                    step(&cuda, &mut xr.borrow_mut(), &w)?;
                    cuda.download(&xr.borrow()).map(drop)
                },
                &mut |_| Ok(()),
            )
        })
        .expect_err("a download in a captured step is refused");
    let text = err.to_string();
    println!("{text}");
    assert!(
        text.contains("capturing the repeated step as a CUDA graph")
            && text.contains("cuMemcpyDtoHAsync")
            && text.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"),
        "{text}"
    );
    // The same step eagerly is fine (the refusal is the capture's).
    set_graphs(false);
    let mut runs = 0;
    cuda.planned(&mut plan, &mut || {
        cuda.repeat(
            2,
            &mut || {
                step(&cuda, &mut xr.borrow_mut(), &w)?;
                cuda.download(&xr.borrow()).map(drop)
            },
            &mut |_| {
                runs += 1;
                Ok(())
            },
        )
    })
    .expect("eagerly a download is allowed");
    assert_eq!(runs, 2);
    set_graphs(true);
    // A step outside a pool scope allocates each of its tensors.
    let err = cuda
        .repeat(
            TIMES,
            &mut || step(&cuda, &mut xr.borrow_mut(), &w),
            &mut |_| Ok(()),
        )
        .expect_err("an allocation in a captured step is refused");
    let text = err.to_string();
    println!("{text}");
    assert!(
        text.contains("capturing the repeated step")
            && text.contains("cuMemAlloc")
            && text.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"),
        "{text}"
    );
    // A step that keeps a tensor it made past its run (here a row of x, pushed to a list): the
    // replays would write the capture's copy, not the one kept, so it is refused.
    let err = cuda
        .planned(&mut plan, &mut || {
            let mut x = cuda.upload_bf16(&values(L * D, 1, 1.0), L, D)?;
            let mut kept = Vec::new();
            cuda.repeat(
                TIMES,
                &mut || {
                    step(&cuda, &mut x, &w)?;
                    kept.push(cuda.slice_rows(&x, 0, 1)?);
                    Ok(())
                },
                &mut |_| Ok(()),
            )
        })
        .expect_err("a step that keeps a tensor it made is refused");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("changed the activations it holds"), "{text}");
    // The backend works after a failed capture.
    let y = cuda
        .download(&xr.borrow())
        .expect("usable after a failed capture");
    assert_eq!(y.len(), L * D);
}

#[test]
fn a_planner_runs_the_body_each_time_without_a_device() {
    let planner = CudaBackend::planner();
    assert!(!planner.graphs_enabled());
    let w = weight(&planner);
    let mut x = planner.upload(&vec![0.0; L * D], L, D).expect("x");
    let (mut bodies, mut afters) = (0, Vec::new());
    let xr = std::cell::RefCell::new(&mut x);
    planner
        .repeat(
            3,
            &mut || {
                bodies += 1;
                step(&planner, &mut xr.borrow_mut(), &w)
            },
            &mut |i| {
                afters.push(i);
                Ok(())
            },
        )
        .expect("a plan");
    assert_eq!((bodies, afters), (3, vec![0, 1, 2]));
}
