//! Compiles `mdm/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! writes the encoded descriptor set next to the generated code for reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files: Vec<PathBuf> = std::fs::read_dir(proto_dir.join("mdm/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [&proto_dir])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("mdm_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        // `AgentService.Connect` would clash with the generated `Client::connect`
        // constructor; clients are built with `new(channel)` instead.
        .build_transport(false)
        // Messages that carry a passcode get a hand-written Debug (lib.rs)
        // that never prints it.
        .skip_debug([
            "mdm.v1.EnrollRequest",
            "mdm.v1.GenerateCompanyPasscodeResponse",
            "mdm.v1.ResetPasscodeResponse",
            "mdm.v1.ResetPasscodeCommand",
        ])
        .compile_fds(fds)?;
    Ok(())
}
