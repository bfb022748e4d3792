//! What a run tells the person waiting for it, on stderr: named stages, and a progress bar for
//! the denoising steps with the time per step and the time left when stderr is a terminal; one
//! line per stage and step when it is not (logs, CI); nothing but errors with `--quiet`.

use kontext_engine::pipeline::Progress;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How much to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Errors only.
    Quiet,
    /// One line per stage and step.
    Lines,
    /// Stages as lines, the denoising steps as one bar redrawn in place.
    Bar,
}

impl Verbosity {
    /// `Bar` on a terminal, `Lines` otherwise; `Quiet` when asked.
    pub fn detect(quiet: bool) -> Verbosity {
        if quiet {
            Verbosity::Quiet
        } else if std::io::stderr().is_terminal() {
            Verbosity::Bar
        } else {
            Verbosity::Lines
        }
    }
}

/// Reports one image's stages.
pub struct Reporter {
    pub verbosity: Verbosity,
    /// "image 2/4 (seed 43): " when several images come from one load.
    pub prefix: String,
    /// What "encoding the context image" says of several references, e.g. "3 context images".
    pub context: String,
    pub device: &'static str,
    start: Option<Instant>,
    done: Duration,
}

impl Reporter {
    pub fn new(verbosity: Verbosity, device: &'static str) -> Reporter {
        Reporter {
            verbosity,
            prefix: String::new(),
            context: "the context image".into(),
            device,
            start: None,
            done: Duration::ZERO,
        }
    }

    /// A line of its own (a note, a stage), unless quiet.
    pub fn line(&self, text: &str) {
        if self.verbosity != Verbosity::Quiet {
            eprintln!("{}{text}", self.prefix);
        }
    }

    /// The engine's progress callback.
    pub fn report(&mut self, p: &Progress) {
        match p {
            Progress::EncodingText => self.line("encoding the prompt"),
            Progress::EncodingImage => self.line(&format!("encoding {}", self.context)),
            Progress::Denoising { steps } => {
                self.start = Some(Instant::now());
                self.done = Duration::ZERO;
                match self.verbosity {
                    Verbosity::Bar => self.bar(0, *steps),
                    _ => self.line(&format!("denoising: {steps} steps on {}", self.device)),
                }
            }
            Progress::Step { step, steps, took } => {
                self.done += *took;
                match self.verbosity {
                    Verbosity::Quiet => {}
                    Verbosity::Lines => self.line(&format!(
                        "step {step:>3}/{steps}  {:>8.3} s",
                        took.as_secs_f64()
                    )),
                    Verbosity::Bar => {
                        self.bar(*step, *steps);
                        if step == steps {
                            eprintln!();
                        }
                    }
                }
            }
            Progress::Decoding => self.line("decoding"),
        }
    }

    fn bar(&self, step: usize, steps: usize) {
        eprint!(
            "\r\x1b[2K{}{}",
            self.prefix,
            bar_text(step, steps, self.done)
        );
        let _ = std::io::stderr().flush();
    }
}

/// `denoising [#########...........]  9/28  1.52 s/it  29 s left`: the rate as s/it when a
/// step takes a second or more, it/s when less; the time left from the mean step so far.
pub fn bar_text(step: usize, steps: usize, elapsed: Duration) -> String {
    const WIDTH: usize = 24;
    let filled = (step * WIDTH).checked_div(steps).unwrap_or(0).min(WIDTH);
    let bar = format!("{}{}", "#".repeat(filled), ".".repeat(WIDTH - filled));
    let mut s = format!("denoising [{bar}] {step:>3}/{steps}");
    if step > 0 {
        let per = elapsed.as_secs_f64() / step as f64;
        if per >= 1.0 {
            s += &format!("  {per:.2} s/it");
        } else if per > 0.0 {
            s += &format!("  {:.2} it/s", 1.0 / per);
        }
        let left = per * (steps - step.min(steps)) as f64;
        s += &format!("  {} left", human_duration(left));
    }
    s
}

/// `42 s`, `3 min 05 s`, `1 h 02 min`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_rate_and_time_left() {
        assert_eq!(
            bar_text(0, 28, Duration::ZERO),
            format!("denoising [{}]   0/28", ".".repeat(24))
        );
        let s = bar_text(7, 28, Duration::from_secs_f64(10.5));
        assert!(s.starts_with("denoising [######.................."), "{s}");
        assert!(s.contains("  7/28  1.50 s/it  32 s left"), "{s}");
        let fast = bar_text(20, 28, Duration::from_secs_f64(5.0));
        assert!(fast.contains("4.00 it/s  2 s left"), "{fast}");
        assert!(bar_text(28, 28, Duration::from_secs(56))
            .contains("[########################]  28/28  2.00 s/it  0 s left"));
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(42.4), "42 s");
        assert_eq!(human_duration(185.0), "3 min 05 s");
        assert_eq!(human_duration(3720.0), "1 h 02 min");
    }
}
