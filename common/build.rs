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
        .compile_protos(&["../proto/cvdist.proto"], &["../proto"])?;
    Ok(())
}
