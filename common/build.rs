/// Every `double` of a message written to a run directory goes through `common/src/nonfinite.rs`.
const NONFINITE: &str = "#[serde(with = \"crate::nonfinite\")]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of a system install.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../proto/cvdist.proto");
    // Spec and metrics are also written to run directories as JSON.
    let serde = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";
    tonic_prost_build::configure()
        .type_attribute(".cvdist.v1.JobSpec", serde)
        .type_attribute(".cvdist.v1.EpochMetrics", serde)
        .type_attribute(".cvdist.v1.Progress", serde)
        // NaN/inf (a diverged loss) must survive the round trip through the run directory.
        .field_attribute(".cvdist.v1.JobSpec.lr", NONFINITE)
        .field_attribute(".cvdist.v1.JobSpec.momentum", NONFINITE)
        .field_attribute(".cvdist.v1.JobSpec.weight_decay", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.train_loss", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.train_acc", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.test_loss", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.test_acc", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.lr", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.seconds", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.images_per_sec", NONFINITE)
        .field_attribute(".cvdist.v1.EpochMetrics.allreduce_seconds", NONFINITE)
        .field_attribute(".cvdist.v1.Progress.loss", NONFINITE)
        .field_attribute(".cvdist.v1.Progress.acc", NONFINITE)
        .field_attribute(".cvdist.v1.Progress.images_per_sec", NONFINITE)
        .field_attribute(".cvdist.v1.Progress.step_seconds", NONFINITE)
        .field_attribute(".cvdist.v1.Progress.allreduce_seconds", NONFINITE)
        .compile_protos(&["../proto/cvdist.proto"], &["../proto"])?;
    Ok(())
}
