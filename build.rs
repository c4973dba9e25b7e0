//! Compiles every contract under `proto/` with a pure-Rust protobuf compiler
//! (protox), so building needs no system `protoc`. The encoded descriptor set
//! is kept in OUT_DIR for gRPC server reflection. Also stamps the commit the
//! binary is built from into `BUILD_GIT_SHA`, for `choco_build_info`.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut protos = Vec::new();
    collect_protos(Path::new("proto"), &mut protos)?;
    protos.sort();
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(&protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("choco_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;

    println!("cargo:rustc-env=BUILD_GIT_SHA={}", git_sha());
    Ok(())
}

/// `GIT_SHA` when the build is given one (a container build has no `.git`),
/// else the checkout's commit, else `unknown`. (Not a `CHOCO_` name: cargo
/// also sets it when running tests, and `CHOCO_` variables are configuration.)
fn git_sha() -> String {
    println!("cargo:rerun-if-env-changed=GIT_SHA");
    if let Ok(sha) = std::env::var("GIT_SHA")
        && !sha.trim().is_empty()
    {
        return sha.trim().to_string();
    }
    // Rebuild the stamp when the checkout moves to another commit. (A path
    // that does not exist would rerun this script on every build.)
    if Path::new(".git/HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
    }
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(reference) = head.trim().strip_prefix("ref: ")
        && Path::new(".git").join(reference).exists()
    {
        println!("cargo:rerun-if-changed=.git/{reference}");
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|sha| sha.trim().to_string())
        .filter(|sha| !sha.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
