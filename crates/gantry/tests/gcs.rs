//! Google Cloud Storage (`gs://`) against a real emulator, fake-gcs-server, started on
//! loopback (fetched into `target/pytools` when missing; see `common/emulators.rs`): the
//! scenarios every store runs (`common/suite.rs`), the environment's emulator variable and
//! options over it, a missing bucket and credentials that are not. One test function, because
//! the client is configured from the process environment and the last scenario kills the
//! server.

mod common;
#[path = "common/emulators.rs"]
mod emulators;
#[path = "common/suite.rs"]
mod suite;

use common::*;
use emulators::*;
use gantry::Config;
use suite::*;

struct Gcs(Emulator);

impl Store for Gcs {
    fn url(&self, key: &str) -> String {
        format!("gs://{GCS_BUCKET}/{key}")
    }
    fn put(&self, key: &str, bytes: &[u8]) {
        gcs_put(&self.0, key, bytes);
    }
    fn kill(&mut self) {
        self.0.stop();
    }
}

#[test]
fn google_cloud_storage_against_fake_gcs_server() {
    let Some(bin) = fake_gcs() else { return };
    let store = Gcs(start_fake_gcs(&bin));
    let endpoint = store.0.endpoint();
    // The emulator variable Google's own clients read: requests go there, unsigned.
    std::env::set_var("STORAGE_EMULATOR_HOST", &endpoint);
    let dir = scratch();
    let config = Config::default();

    random_layouts(&store, dir.path(), &config);
    let local = upload_sharded(&store, dir.path());
    sharded(&store, &config, &local);
    odd_keys(&store, dir.path(), &config);

    // Options go over the environment: with the emulator variable pointing nowhere, the base
    // URL given as an option reaches the server.
    std::env::set_var("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9");
    let options = Config::default()
        .object_option("google_base_url", &endpoint)
        .object_option("google_skip_signature", "true")
        .object_option("allow_http", "true");
    sharded(&store, &options, &local);
    let bad = Config::default().object_option("google_no_such_option", "1");
    assert!(Loader::new(bad)
        .map(|_| ())
        .unwrap_err()
        .to_string()
        .contains("google_no_such_option"));
    std::env::set_var("STORAGE_EMULATOR_HOST", &endpoint);

    // Missing bucket, key, shard; a corrupt header.
    let bucket = format!("gs://no-such-bucket-{}/m.safetensors", std::process::id());
    expect_err(&config, &bucket, &["no-such-bucket"], "gantry-test");
    missing(&store, dir.path(), &config, "gantry-test");
    header_lengths(&store, dir.path(), &config, "gantry-test");

    // Credentials that are not: a service account key whose private key is no key. An error
    // naming the source, and the key nowhere in it.
    let secret = "gantry-test-private-key-7d1c0ffee";
    let key = format!(
        r#"{{"private_key":"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n","private_key_id":"k1","client_email":"t@example.com"}}"#
    );
    let bad = config.clone().object_option("google_service_account_key", key);
    expect_err(&bad, &store.url("cases/case0.safetensors"), &["gs://weights"], secret);

    // Rewritten mid-load: the emulator ignores If-Match, so this is the generation pin at work.
    rewritten_mid_load(&store, dir.path(), &config);
    rewritten_after_open(&store, dir.path(), &config);
    cache_and_sha256(&store, dir.path(), &config, &local);
    killed_mid_load(store, dir.path(), &config);
}

use gantry::Loader;
