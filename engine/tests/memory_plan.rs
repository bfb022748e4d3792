//! The memory plan at the real Kontext config, from sparse full-size checkpoints (real headers,
//! no data): every mode's peak at 512², 1024² and 1024² with two references, and the card
//! targets of issue 12. Only headers are read; nothing runs on a device.

use kontext_engine::memory::{
    check_host, choose, gib, plan_mode, MemoryOptions, MemoryPlan, Mode, GIB,
};
use kontext_engine::pipeline::Components;
use kontext_engine::request::{plan_sizes, EditOptions, ResizePolicy};
use kontext_loader::sparse::write_full_size_model;

fn sizes(side: usize, refs: usize) -> kontext_engine::request::SizePlan {
    let opts = EditOptions {
        width: Some(side),
        height: Some(side),
        resize: ResizePolicy::None,
        ..Default::default()
    };
    plan_sizes(&vec![(side, side); refs], &opts).unwrap()
}

fn show(p: &MemoryPlan) -> String {
    let stages: Vec<String> = p
        .stages
        .iter()
        .map(|s| format!("{} {}", s.stage, gib(s.peak)))
        .collect();
    format!(
        "{:<8} peak {} (weights {}, slots {}, host {}, streamed/step {:.2} GB) [{}]",
        p.mode().name(),
        gib(p.peak_bytes),
        gib(p.weight_bytes),
        gib(p.slot_bytes),
        gib(p.host_bytes),
        p.streamed_per_step as f64 / 1e9,
        stages.join(", ")
    )
}

#[test]
fn full_size_plans_meet_the_card_targets() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_full_size_model(dir.path(), false).unwrap();
    let c = Components::open(&paths).unwrap();
    let none = MemoryOptions::default();
    for (label, side, refs) in [
        ("512²", 512, 1),
        ("1024²", 1024, 1),
        ("1024² + 2 refs", 1024, 2),
    ] {
        let s = sizes(side, refs);
        for mode in Mode::ALL {
            let p = plan_mode(&c, &s, 28, mode, &none, None, None).unwrap();
            println!("{label:<15} {}", show(&p));
        }
    }
    let s = sizes(1024, 1);
    let fp8 = plan_mode(&c, &s, 28, Mode::Fp8, &none, None, None).unwrap();
    assert!(fp8.peak_bytes <= 20 * GIB, "mode 2 {}", gib(fp8.peak_bytes));
    // Its streamed text encoders live in page-locked host memory: a machine without room for
    // them is refused, naming both sizes; one with room is not.
    let err = check_host(&fp8, Some(4 * GIB)).unwrap_err().to_string();
    assert!(
        err.contains("page-locked") && err.contains("4.00 GiB"),
        "{err}"
    );
    check_host(&fp8, Some(64 * GIB)).unwrap();
    for (card, target) in [(16u64, 14.0f64), (12, 10.5)] {
        let budget = (target * GIB as f64) as u64;
        let opts = MemoryOptions {
            mode: Some(Mode::Stream),
            ..Default::default()
        };
        let (plans, chosen) = choose(&c, &s, 28, &opts, Some(budget), None).unwrap();
        let p = &plans[chosen.unwrap()];
        println!("{card} GB card (≤ {target} GB): {}", show(p));
        assert!(p.peak_bytes <= budget);
    }
}
