//! `cvdist eval`: evaluation runs in the worker binary (libtorch), which writes its result
//! as JSON; this side reads it, draws the confusion matrix and prints the accuracies.

use super::handover;
use super::EvalArgs;
use crate::report;
use anyhow::Context;
use cvdist_common::term::stderr_line;

/// What `cvdist-worker eval --json-out` writes (`cvdist_worker::eval::EvalReport`; the
/// fields this side uses).
#[derive(serde::Deserialize)]
struct EvalResult {
    model: String,
    samples: u64,
    accuracy: f64,
    per_class: Vec<f64>,
    confusion: Vec<Vec<u64>>,
    classes: Vec<String>,
}

pub(super) fn run(a: EvalArgs) -> anyhow::Result<i32> {
    let out = &a.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = out.join("eval.json");
    let mut args = a.eval.to_flags();
    args.push("--json-out".into());
    args.push(json_path.display().to_string());
    let code = handover::run_child("eval", &args)?;
    if code != 0 {
        return Ok(code);
    }
    let text = std::fs::read_to_string(&json_path).with_context(|| format!("reading {}", json_path.display()))?;
    let result: EvalResult = serde_json::from_str(&text).with_context(|| format!("parsing {}", json_path.display()))?;
    let names: Vec<&str> = result.classes.iter().map(String::as_str).collect();
    let png = out.join("confusion.png");
    let rendered = report::write_confusion_matrix(&result.confusion, &names, &png)?;
    for w in &rendered.warnings {
        stderr_line(format_args!("warning: {w}"));
    }
    println!("{}: test accuracy {:.2}% on {} images", result.model, result.accuracy * 100.0, result.samples);
    for (name, acc) in result.classes.iter().zip(&result.per_class) {
        println!("  {name:<12} {:6.2}%", acc * 100.0);
    }
    println!("wrote {} and {}", json_path.display(), png.display());
    Ok(0)
}
