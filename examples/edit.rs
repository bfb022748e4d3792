//! The engine API in one page: load a Kontext model once, then edit an image twice in a row
//! (the first result is the context of the second), with a progress callback.
//!
//! ```sh
//! cargo run --release --example edit -- tests/fixtures/pipeline/tiny-kontext \
//!     tests/fixtures/pipeline/context.png /tmp/turn
//! ```
//! writes /tmp/turn1.png and /tmp/turn2.png. (The committed tiny model has random weights: the
//! pictures are noise, the mechanics are real.)

use kontext_engine::image::RgbImage;
use kontext_engine::pipeline::{Device, Pipeline, Progress};
use kontext_engine::request::{EditOptions, NoiseSource, ResizePolicy};
use kontext_loader::ModelPaths;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, out_prefix] = args.as_slice() else {
        return Err("usage: edit MODEL_DIR IMAGE OUT_PREFIX".into());
    };

    // Load once: every part is found from the model folder; the pipeline is Send + Sync.
    let pipeline = Pipeline::load(&ModelPaths::discover(model.as_ref())?, Device::Cpu)?;

    let opts = EditOptions {
        steps: 8,
        guidance: 2.5,
        noise: NoiseSource::Seed(42),
        resize: ResizePolicy::None,
        ..EditOptions::default()
    };
    let mut progress = |p: &Progress| {
        if let Progress::Step { step, steps, took } = p {
            eprintln!("step {step}/{steps} ({:.0} ms)", took.as_secs_f64() * 1e3);
        }
    };

    let mut context = RgbImage::open(image.as_ref())?;
    for (turn, prompt) in ["Make the cat wear a red scarf", "Now make it snow"]
        .iter()
        .enumerate()
    {
        let out = pipeline.edit(&context, prompt, &opts, &mut progress)?;
        for note in &out.notes {
            eprintln!("note: {note}");
        }
        let path = PathBuf::from(format!("{out_prefix}{}.png", turn + 1));
        out.image.save(&path)?; // atomic: temporary file, then rename
        eprintln!("wrote {}", path.display());
        context = out.image; // multi-turn: nothing is reloaded
    }
    Ok(())
}
