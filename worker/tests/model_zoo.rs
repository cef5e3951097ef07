//! Every model of the control plane's list builds, with the parameter, tensor, buffer and MAC
//! counts of the reference facts (/work/shared/reference/cifar-models.md, measured on the
//! PyTorch reference implementations), produces [N, 10] logits, and starts from PyTorch's
//! default initialisation.

use cvdist_worker::models;
use tch::{nn, Device, Kind, Tensor};

/// (name, params, param tensors, PyTorch buffers, conv+linear MACs). The facts file gives no
/// tensor/buffer counts for the He et al. nets; those are `None` (measured on our Python
/// reference: 59/57 for depth 20) and only checked for the 2:3 BN relation below.
type Row = (&'static str, u64, Option<usize>, Option<usize>, u64);

const REFERENCE: &[Row] = &[
    ("vgg11", 9_231_114, Some(34), Some(24), 152_769_536),
    ("vgg13", 9_416_010, Some(42), Some(30), 228_267_008),
    ("vgg16", 14_728_266, Some(54), Some(39), 313_201_664),
    ("vgg19", 20_040_522, Some(66), Some(48), 398_136_320),
    ("resnet18", 11_173_962, Some(62), Some(60), 555_422_720),
    ("resnet34", 21_282_122, Some(110), Some(108), 1_159_402_496),
    ("resnet50", 23_520_842, Some(161), Some(159), 1_297_829_888),
    ("resnet101", 42_512_970, Some(314), Some(312), 2_509_983_744),
    ("resnet152", 58_156_618, Some(467), Some(465), 3_722_137_600),
    ("mobilenetv2", 2_296_922, Some(173), Some(171), 91_154_944),
    ("resnet20", 269_722, None, None, 40_551_040),
    ("resnet32", 464_154, None, None, 68_862_592),
    ("resnet44", 658_586, None, None, 97_174_144),
    ("resnet56", 853_018, None, None, 125_485_696),
    ("resnet110", 1_727_962, None, None, 252_887_680),
    ("plain20", 269_722, None, None, 40_551_040),
    ("plain32", 464_154, None, None, 68_862_592),
    ("plain44", 658_586, None, None, 97_174_144),
    ("plain56", 853_018, None, None, 125_485_696),
    ("plain110", 1_727_962, None, None, 252_887_680),
];

#[test]
fn reference_table_covers_control_plane_list() {
    let ours: Vec<_> = REFERENCE.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(ours, cvdist_common::models::MODELS.to_vec());
}

#[test]
fn every_model_matches_reference_counts_and_shapes() {
    let infos = models::all();
    assert_eq!(infos.len(), REFERENCE.len(), "all() must cover every model");
    for (&(name, params, tensors, buffers, macs), info) in REFERENCE.iter().zip(&infos) {
        assert_eq!(info.name, name);
        assert_eq!(info.params, params, "{name}: trainable parameters");
        assert_eq!(info.macs, macs, "{name}: MACs");

        let vs = nn::VarStore::new(Device::Cpu);
        let model = models::build(name, &vs.root(), 10).expect("known model builds");
        let trainable = vs.trainable_variables();
        let n_params: u64 = trainable.iter().map(|t| t.numel() as u64).sum();
        assert_eq!(n_params, params, "{name}: trainable parameters from the VarStore");

        let vars = vs.variables();
        let n_bn = vars.keys().filter(|k| k.ends_with(".running_mean")).count();
        let n_buffers = vars.len() - trainable.len();
        // tch's BatchNorm keeps running_mean and running_var but no num_batches_tracked,
        // while PyTorch's buffer count has all three per BN layer.
        assert_eq!(n_buffers, 2 * n_bn, "{name}: tch buffers are 2 per BN layer");
        if let Some(t) = tensors {
            assert_eq!(trainable.len(), t, "{name}: parameter tensors");
        }
        if let Some(b) = buffers {
            assert_eq!(3 * n_bn, b, "{name}: PyTorch buffers (incl. num_batches_tracked)");
        }

        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| model.forward_t(&x, false));
        assert_eq!(y.size(), vec![2, 10], "{name}: eval logits shape");
        if name.ends_with("20") || name == "mobilenetv2" {
            let y = model.forward_t(&x, true);
            assert_eq!(y.size(), vec![2, 10], "{name}: train logits shape");
        }
    }
}

#[test]
fn unknown_model_and_bad_classes_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let err = models::build("resnet26", &vs.root(), 10).expect_err("resnet26 is not in the zoo");
    let msg = err.to_string();
    assert!(msg.contains("resnet26") && msg.contains("mobilenetv2"), "{msg}");
    assert!(models::info("VGG16").is_err());
    assert!(models::build("vgg11", &vs.root(), 0).is_err());
}

#[test]
fn num_classes_sets_head_width() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = models::build("resnet20", &vs.root(), 100).expect("builds");
    let y = tch::no_grad(|| model.forward_t(&Tensor::zeros([3, 3, 32, 32], tch::kind::FLOAT_CPU), false));
    assert_eq!(y.size(), vec![3, 100]);
}

/// Conv/linear weights and biases ~ U(±1/√fan_in) with fan_in = (C_in/groups)·kh·kw, BN γ=1,
/// β=0, running stats 0/1 — PyTorch's defaults rather than tch's.
#[test]
fn default_init_matches_pytorch() {
    for name in ["vgg11", "mobilenetv2", "resnet20"] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = models::build(name, &vs.root(), 10).expect("builds");
        let vars = vs.variables();
        for (key, t) in &vars {
            let prefix = key.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
            let is_bn = vars.contains_key(&format!("{prefix}.running_mean"));
            let f = |t: &Tensor| Vec::<f32>::try_from(t.detach().flatten(0, -1)).expect("float tensor");
            if is_bn {
                let expect = if key.ends_with(".weight") || key.ends_with(".running_var") { 1.0 } else { 0.0 };
                assert!(f(t).iter().all(|&v| v == expect), "{key}: expected all {expect}");
                continue;
            }
            let w = vars.get(&format!("{prefix}.weight")).expect("weight beside bias");
            let size = w.size();
            let fan_in: i64 = size[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let vals = f(t);
            let max = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(max <= bound, "{key}: max |w| {max} exceeds bound {bound}");
            // Large tensors of a uniform draw get close to the bound; tch's Kaiming default
            // (bound √6/√fan_in) or zero biases would fail one of these.
            if vals.len() >= 500 {
                assert!(max > 0.95 * bound, "{key}: max |w| {max} far below bound {bound}");
                let var = vals.iter().map(|v| v * v).sum::<f32>() / vals.len() as f32;
                let expect = bound * bound / 3.0;
                assert!((var / expect - 1.0).abs() < 0.15, "{key}: variance {var} vs {expect}");
            } else {
                assert!(max > 0.0, "{key}: all zero");
            }
        }
    }
}

#[test]
fn model_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let vs = nn::VarStore::new(Device::Cpu);
    let model = models::build("resnet20", &vs.root(), 10).expect("builds");
    assert_send(&model);
    let handle = std::thread::spawn(move || {
        tch::no_grad(|| model.forward_t(&Tensor::zeros([1, 3, 32, 32], tch::kind::FLOAT_CPU), false).size())
    });
    assert_eq!(handle.join().expect("thread"), vec![1, 10]);
}
