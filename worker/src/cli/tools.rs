//! The small commands around training: the model zoo listing, evaluation, export and
//! import of PyTorch weights, and the device check `cvdist local` runs.

use super::{EvalArgs, ExportArgs, ImportArgs};
use anyhow::Context;
use cvdist_common::choices::DeviceRequest;
use tch::Device;

use crate::{device, eval, interop, models};

pub(super) fn print_models() -> anyhow::Result<()> {
    println!("{:<12} {:>12} {:>16}", "MODEL", "PARAMS", "MACS/IMAGE");
    for m in models::all() {
        println!("{:<12} {:>12} {:>16}", m.name, group(m.params), group(m.macs));
    }
    Ok(())
}

/// `n` with thousands separators: 1234567 -> "1,234,567".
fn group(n: u64) -> String {
    // Groups of three digits, least significant first.
    let mut groups = vec![n % 1000];
    let mut rest = n / 1000;
    while rest > 0 {
        groups.push(rest % 1000);
        rest /= 1000;
    }
    let mut out = String::new();
    for (i, g) in groups.iter().rev().enumerate() {
        if i == 0 {
            out.push_str(&g.to_string());
        } else {
            out.push_str(&format!(",{g:03}"));
        }
    }
    out
}

/// `check-device`: prints the device `--device` resolves to here.
pub(super) fn check_device(request: DeviceRequest) -> anyhow::Result<()> {
    let name = match device::for_request(request)? {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".into(),
    };
    println!("{name}");
    Ok(())
}

pub(super) fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let e = &a.eval;
    let device = device::for_request(e.device)?;
    let r = eval::evaluate_checkpoint(&e.checkpoint, e.dataset, e.data.as_deref(), e.test_samples, device)?;
    println!("{} ({}): test accuracy {:.2}% on {} images", r.model, r.checkpoint, r.accuracy * 100.0, r.samples);
    for (name, acc) in r.classes.iter().zip(&r.per_class) {
        println!("  {name:<12} {:6.2}%", acc * 100.0);
    }
    if let Some(path) = &a.json_out {
        let text = serde_json::to_vec_pretty(&r).expect("report serialises");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        cvdist_common::atomic_file::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub(super) fn export(a: ExportArgs) -> anyhow::Result<()> {
    let s = interop::export_checkpoint(&a.checkpoint, &a.out, a.num_batches_tracked)?;
    println!(
        "{}: wrote {} tensors ({} parameters, num_batches_tracked {}) to {}",
        s.model,
        s.tensors,
        group(s.parameters),
        s.num_batches_tracked,
        s.out.display()
    );
    Ok(())
}

pub(super) fn import(a: ImportArgs) -> anyhow::Result<()> {
    let s = interop::import_weights(&a.model, &a.weights, &a.out)?;
    println!(
        "{}: imported {} tensors ({} num_batches_tracked ignored) into {}; warm-start with train --resume {}",
        s.model,
        s.tensors,
        s.ignored_counters,
        s.checkpoint.display(),
        s.checkpoint.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped() {
        assert_eq!(super::group(0), "0");
        assert_eq!(super::group(999), "999");
        assert_eq!(super::group(1_000), "1,000");
        assert_eq!(super::group(272_474), "272,474");
        assert_eq!(super::group(23_520_842), "23,520,842");
        assert_eq!(super::group(1_000_007), "1,000,007");
    }
}
