//! Endpoint flags and object-storage options the clients cannot use: one `error:` line naming
//! the flag or option and how to write it, exit status 1, no panic, nothing sent anywhere.

use std::process::Command;

/// Runs `gantry args` with credentials set (so nothing falls back to an instance-metadata
/// lookup); its status and stderr.
fn gantry(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "gantry-test-id")
        .env("AWS_SECRET_ACCESS_KEY", "gantry-test-secret")
        .env("GOOGLE_SKIP_SIGNATURE", "true")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("STORAGE_EMULATOR_HOST")
        .output()
        .unwrap();
    assert!(out.stdout.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_endpoints_name_their_flag() {
    let s3 = "s3://weights/m.safetensors";
    let gs = "gs://weights/m.safetensors";
    let az = "az://weights/m.safetensors";
    let cases: [(&[&str], &[&str]); 11] = [
        (&["inspect", s3, "--s3-endpoint", "not a url"], &["--s3-endpoint", "'not a url'"]),
        (&["inspect", s3, "--s3-endpoint", "127.0.0.1:9000"], &["--s3-endpoint", "no scheme"]),
        (&["inspect", s3, "--s3-endpoint", "ftp://127.0.0.1:21"], &["--s3-endpoint", "ftp://"]),
        (&["load", s3, "--s3-endpoint", "not a url"], &["--s3-endpoint"]),
        (&["inspect", gs, "--gcs-endpoint", "not a url"], &["--gcs-endpoint", "google_base_url"]),
        (&["inspect", az, "--azure-endpoint", "x y"], &["--azure-endpoint"]),
        (&["inspect", s3, "--s3-region", "us east 1"], &["--s3-region", "' '"]),
        (&["inspect", s3, "--object-option", "proxy_url=not a url"], &["proxy_url", "no"]),
        (&["inspect", "s3://my bucket/m.safetensors"], &["bucket name 'my bucket'"]),
        (&["inspect", "ftp://host/m.safetensors"], &["not an object source", "'ftp://'"]),
        (&["inspect", "https://example.com/m.safetensors"], &["not an object source", "s3://"]),
    ];
    for (args, wants) in cases {
        let (status, stderr) = gantry(args);
        assert_eq!(status, Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
        for want in wants {
            assert!(lines[0].contains(want), "{args:?}: {stderr}");
        }
    }
}
