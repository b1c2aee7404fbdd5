//! Object-storage settings a user types (endpoints, URL-valued options, regions, bucket and
//! container names, in options and in the environment) that the clients cannot use: each is a
//! clean `Error` naming the setting, never a panic, and nothing is sent anywhere. No server is
//! needed: every case fails before a request. One test function, because some cases set the
//! process environment.

use std::panic::{catch_unwind, AssertUnwindSafe};

use gantry::{Config, Loader};

/// Opening `source` with `config` is an error (not a panic) whose text holds every one of
/// `wants`; and so is making a loader from `config` when `loader_too`.
fn refused(source: &str, config: &Config, wants: &[&str], loader_too: bool) {
    let opened = catch_unwind(AssertUnwindSafe(|| gantry::open_with(source, config).map(|_| ())));
    let e = match opened {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => panic!("{source}: opened"),
        Err(_) => panic!("{source}: the client panicked"),
    };
    assert!(matches!(gantry::open_with(source, config), Err(gantry::Error::Config(_))), "{e}");
    for want in wants {
        assert!(e.contains(want), "{source}: {e}");
    }
    if loader_too {
        let e = Loader::new(config.clone()).map(|_| ()).unwrap_err().to_string();
        for want in wants {
            assert!(e.contains(want), "{source} (loader): {e}");
        }
    }
}

#[test]
fn settings_that_cannot_work_are_errors_naming_them() {
    // Credentials for every store, so that nothing falls back to an instance-metadata lookup.
    std::env::set_var("AWS_ACCESS_KEY_ID", "gantry-test-id");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "gantry-test-secret");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AZURE_STORAGE_ACCOUNT_NAME", "gantrytest");
    std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", "Z2FudHJ5LXRlc3Qta2V5");
    std::env::set_var("GOOGLE_SKIP_SIGNATURE", "true");

    let option = |k: &str, v: &str| Config::default().object_option(k, v);
    let s3 = "s3://weights/m.safetensors";
    for (source, key, value, want) in [
        (s3, "aws_endpoint_url", "not a url", "' '"),
        (s3, "aws_endpoint_url", "127.0.0.1:9000", "no scheme"),
        (s3, "endpoint", "ftp://127.0.0.1:9000", "ftp://"),
        (s3, "aws_endpoint_url", "http://host/a b", "' '"),
        (s3, "proxy_url", "not a url", "' '"),
        (s3, "aws_proxy_url", "ftp://proxy:21", "ftp://"),
        (s3, "aws_region", "us east 1", "' '"),
        (s3, "aws_metadata_endpoint", "169.254.169.254", "no scheme"),
        ("gs://weights/m.safetensors", "google_base_url", "not a url", "' '"),
        ("gs://weights/m.safetensors", "google_proxy_url", "nowhere", "no scheme"),
        ("az://weights/m.safetensors", "azure_storage_endpoint", "not a url", "' '"),
        ("az://weights/m.safetensors", "azure_storage_account_name", "my account", "' '"),
    ] {
        refused(source, &option(key, value), &[key, value, want], true);
    }

    // Bucket, container and account names with characters no store allows.
    for (source, what) in [
        ("s3://my bucket/m.safetensors", "bucket name 'my bucket'"),
        ("gs://my bucket/m.safetensors", "bucket name 'my bucket'"),
        ("az://my container/m.safetensors", "container name 'my container'"),
        ("s3://we%20ights/m.safetensors", "bucket name 'we%20ights'"),
        ("https://my%20acct.blob.core.windows.net/c/m", "storage account name"),
    ] {
        refused(source, &Config::default(), &[source, what], false);
    }

    // The same values from the environment: the error names the variable.
    for (var, value, source) in [
        ("AWS_ENDPOINT_URL", "not a url", s3),
        ("AWS_ENDPOINT_URL", "127.0.0.1:9000", s3),
        ("AWS_REGION", "us east 1", s3),
        ("STORAGE_EMULATOR_HOST", "not a host", "gs://weights/m.safetensors"),
        ("AZURE_STORAGE_ENDPOINT", "not a url", "az://weights/m.safetensors"),
    ] {
        let before = std::env::var(var).ok();
        std::env::set_var(var, value);
        refused(source, &Config::default(), &[var, value], false);
        match before {
            Some(v) => std::env::set_var(var, v),
            None => std::env::remove_var(var),
        }
    }

    // A variable overridden by an option is not used, so not an error: the option is.
    std::env::set_var("AWS_ENDPOINT_URL", "not a url");
    refused(s3, &option("aws_endpoint_url", "nowhere"), &["aws_endpoint_url", "nowhere"], true);
    std::env::remove_var("AWS_ENDPOINT_URL");

    no_credentials();
}

/// A server on loopback that refuses every request (403), as an instance metadata address
/// does off a cloud instance; its address.
fn refusing_server() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let response =
                "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(response.as_bytes());
        }
    });
    address
}

/// No credentials anywhere: the client asks the instance metadata service, which refuses.
/// The error says that no credentials were found and how to give them, not only "403".
fn no_credentials() {
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GOOGLE_SKIP_SIGNATURE"] {
        std::env::remove_var(var);
    }
    let metadata = refusing_server();
    let s3 = Config::default()
        .object_option("aws_endpoint_url", format!("http://{}", refusing_server()))
        .object_option("aws_allow_http", "true")
        .object_option("aws_metadata_endpoint", format!("http://{metadata}"));
    let e = gantry::open_with("s3://weights/m.safetensors", &s3).map(|_| ()).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("no S3 credentials were found"), "{text}");
    assert!(text.contains("AWS_ACCESS_KEY_ID") && text.contains("m.safetensors"), "{text}");
    std::env::set_var("GCE_METADATA_HOST", &metadata);
    std::env::set_var("GCE_METADATA_IP", &metadata);
    let gcs = Config::default()
        .object_option("google_base_url", format!("http://{}", refusing_server()))
        .object_option("google_allow_http", "true");
    let e = gantry::open_with("gs://weights/m.safetensors", &gcs).map(|_| ()).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("no Google Cloud Storage credentials were found"), "{text}");
    assert!(text.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{text}");
}

#[test]
fn endpoint_options_are_one_mapping() {
    use gantry::io::object::{endpoint_options, Provider};
    let options = endpoint_options(Provider::S3, "http://127.0.0.1:9000").unwrap();
    let config =
        options.iter().fold(Config::default(), |c, (k, v)| c.object_option(k.clone(), v.clone()));
    assert!(config.validate().is_ok());
    let e = endpoint_options(Provider::Gcs, "not a url").unwrap_err().to_string();
    assert!(e.contains("google_base_url") && e.contains("not a url"), "{e}");
}
