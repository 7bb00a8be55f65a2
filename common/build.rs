//! Compiles `proto/scabbard/v1/*.proto` into `OUT_DIR`, plus a file descriptor set for
//! server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `.cargo/config.toml` points PROTOC at tools/protoc; a build outside this workspace's
    // config falls back to the vendored binary.
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY-free: build scripts are single-threaded here.
        let p = protoc_bin_vendored::protoc_bin_path()?;
        unsafe_set_protoc(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [
        "task.proto",
        "agent.proto",
        "admin.proto",
        "security.proto",
        "internal.proto",
        "workflow.proto",
        "template.proto",
        "schedule.proto",
        "artifact.proto",
    ]
    .map(|f| root.join("scabbard/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("scabbard_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&files, &[root])?;
    // serde impls following the proto3 JSON mapping (lowerCamelCase names, enums as
    // names, 64-bit integers as strings, bytes as base64), written to
    // `scabbard.v1.serde.rs`. Every field is emitted, defaults included, so a script sees
    // the same keys on every object.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .emit_fields()
        .build(&[".scabbard.v1"])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(p: PathBuf) {
    // SAFETY: called before any other thread exists in this build script.
    unsafe { std::env::set_var("PROTOC", p) };
}
