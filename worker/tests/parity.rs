//! Numerical parity of the tch zoo with our PyTorch reference (tests/python/reference_models.py),
//! in both directions: tch-initialised weights loaded into PyTorch with strict key checking,
//! and PyTorch-initialised weights loaded into tch. Logits in eval and train mode and the BN
//! running statistics after one train-mode forward must agree to 1e-4 of their own scale
//! (see `TOL`).
//!
//! Needs a Python with torch and safetensors: $CVDIST_PYTHON (set by scripts/env.sh), else
//! `python3`. A missing interpreter or module is a failure, not a skip: without it the zoo's
//! claim to match PyTorch is untested.

mod tolerance;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use cvdist_worker::models;
use tch::{nn, Device, Kind, Tensor};

/// Largest allowed `max|Δ| / max(max|reference|, 1)` (see `tolerance::relative_max`). Both
/// sides run float32 math in the same libtorch; where they pick other kernels (another layout,
/// another thread split, a CPU-specific oneDNN/MKL path) they differ by accumulation order
/// only (measured here on AMD EPYC: exactly 0 for all eight comparisons, eprintln'd per
/// model). Relative, so a deeper net's larger outputs do not fail on a CPU with other vector
/// widths; floored at 1, the order of a logit or a normalised activation, so near-zero outputs
/// are not judged against their own rounding. A wrong weight, name or BN mode moves outputs by
/// 1e-2 or more.
const TOL: f64 = 1e-4;
const BATCH: i64 = 8;
/// Architectures covering every block type: VGG, Basic and Bottleneck ResNets, MobileNetV2
/// (depthwise + projection shortcuts), option-A and plain He et al. nets.
const TCH_TO_TORCH: &[&str] = &["resnet18", "vgg16", "mobilenetv2", "resnet20", "plain20", "resnet50"];
const TORCH_TO_TCH: &[&str] = &["resnet20", "mobilenetv2"];

/// tch's generator is global and the two tests run on parallel threads; holding this while
/// drawing keeps each run's weights and inputs reproducible.
static RNG: Mutex<()> = Mutex::new(());

fn python() -> String {
    std::env::var("CVDIST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/parity_check.py")
}

fn run_python(args: &[&str]) {
    let py = python();
    let out = Command::new(&py)
        .arg(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} (set CVDIST_PYTHON, see scripts/env.sh): {e}"));
    assert!(
        out.status.success(),
        "{py} parity_check.py {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).into_iter().collect()
}

/// Relative elementwise difference of `ours` against the reference `theirs`, floored at 1.
fn rel_diff(ours: &Tensor, theirs: &Tensor) -> f64 {
    tolerance::relative_max(theirs, ours, 1.0)
}

fn is_stat(key: &str) -> bool {
    key.ends_with(".running_mean") || key.ends_with(".running_var")
}

/// Moves BN parameters and statistics off γ=1, β=0, μ=0, σ²=1 so that eval-mode logits depend
/// on every BN tensor being loaded under the right name.
fn perturb_bn(vs: &nn::VarStore) {
    // Sorted so the draws, and hence the test's numbers, do not depend on HashMap order.
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    tch::no_grad(|| {
        for (key, t) in &vars {
            let Some((prefix, leaf)) = key.rsplit_once('.') else {
                continue;
            };
            if !vars.contains_key(&format!("{prefix}.running_mean")) {
                continue;
            }
            let (lo, hi) = match leaf {
                "weight" | "running_var" => (0.5, 1.5),
                _ => (-0.2, 0.2),
            };
            let mut t = t.shallow_clone();
            let _ = t.uniform_(lo, hi);
        }
    });
}

/// Eval logits, then train logits (updating running stats), then the stats, all in tch.
fn tch_outputs(model: &dyn nn::ModuleT, vs: &nn::VarStore, x: &Tensor) -> (Tensor, Tensor, BTreeMap<String, Tensor>) {
    tch::no_grad(|| {
        let eval = model.forward_t(x, false);
        let train = model.forward_t(x, true);
        let stats = vs.variables().into_iter().filter(|(k, _)| is_stat(k)).map(|(k, t)| (k, t.copy())).collect();
        (eval, train, stats)
    })
}

struct Diffs {
    eval: f64,
    train: f64,
    stats: f64,
    logit_scale: f64,
}

fn compare(
    name: &str,
    ours: &(Tensor, Tensor, BTreeMap<String, Tensor>),
    eval: &Tensor,
    train: &Tensor,
    stat_of: impl Fn(&str) -> Option<Tensor>,
) -> Diffs {
    let (ours_eval, ours_train, ours_stats) = ours;
    assert_eq!(ours_eval.size(), vec![BATCH, 10], "{name}");
    let mut stats = 0f64;
    for (key, t) in ours_stats {
        let theirs = stat_of(key).unwrap_or_else(|| panic!("{name}: PyTorch has no {key}"));
        stats = stats.max(rel_diff(t, &theirs));
    }
    let d = Diffs {
        eval: rel_diff(ours_eval, eval),
        train: rel_diff(ours_train, train),
        stats,
        logit_scale: eval.abs().max().double_value(&[]).max(train.abs().max().double_value(&[])),
    };
    eprintln!(
        "{name:12} relative max|Δ| eval {:.2e}  train {:.2e}  running stats {:.2e}  (max|logit| {:.3}, {} BN stats)",
        d.eval,
        d.train,
        d.stats,
        d.logit_scale,
        ours_stats.len()
    );
    assert!(!ours_stats.is_empty(), "{name}: no BN statistics compared");
    assert!(d.logit_scale > 1e-3, "{name}: logits too small for the comparison to mean anything");
    assert!(d.eval <= TOL, "{name}: eval logits differ by {}", d.eval);
    assert!(d.train <= TOL, "{name}: train logits differ by {}", d.train);
    assert!(d.stats <= TOL, "{name}: running stats differ by {}", d.stats);
    d
}

#[test]
fn tch_weights_reproduce_pytorch_logits() {
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut built = Vec::new();
    let rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    for (i, &name) in TCH_TO_TORCH.iter().enumerate() {
        tch::manual_seed(1000 + i as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = models::build(name, &vs.root(), 10).expect("known model");
        perturb_bn(&vs);
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&named, dir.path().join(format!("{name}.weights.safetensors")))
            .expect("write weights");
        let x = Tensor::randn([BATCH, 3, 32, 32], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("input", &x)], dir.path().join(format!("{name}.input.safetensors")))
            .expect("write input");
        let ours = tch_outputs(model.as_ref(), &vs, &x);
        built.push((name, ours));
    }
    drop(rng);

    let dir_str = dir.path().to_str().expect("utf-8 temp path");
    let mut args = vec!["tch2torch", dir_str];
    args.extend_from_slice(TCH_TO_TORCH);
    run_python(&args);

    for (name, ours) in &built {
        let theirs = read(&dir.path().join(format!("{name}.torch_out.safetensors")));
        compare(name, ours, &theirs["logits_eval"], &theirs["logits_train"], |k| {
            theirs.get(k).map(|t| t.shallow_clone())
        });
    }
}

#[test]
fn pytorch_weights_reproduce_tch_logits() {
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_str = dir.path().to_str().expect("utf-8 temp path");
    let mut args = vec!["torch2tch", dir_str, "7"];
    args.extend_from_slice(TORCH_TO_TCH);
    run_python(&args);

    for &name in TORCH_TO_TCH {
        let weights_path = dir.path().join(format!("{name}.torch_weights.safetensors"));
        let io = read(&dir.path().join(format!("{name}.torch_io.safetensors")));
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = {
            let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
            models::build(name, &vs.root(), 10).expect("known model")
        };

        // Same key set both ways, so nothing is silently left at its tch initial value.
        let torch_keys: BTreeSet<String> = read(&weights_path).into_keys().collect();
        let tch_keys: BTreeSet<String> = vs.variables().into_keys().collect();
        assert_eq!(torch_keys, tch_keys, "{name}: state_dict keys (less num_batches_tracked)");
        vs.load(&weights_path).expect("load PyTorch weights into the VarStore");

        let ours = tch_outputs(model.as_ref(), &vs, &io["input"]);
        compare(name, &ours, &io["logits_eval"], &io["logits_train"], |k| {
            io.get(&format!("after.{k}")).map(|t| t.shallow_clone())
        });
    }
}
