//! Azure Blob Storage (`az://`, `abfs[s]://`, `https://ACCOUNT.blob.core.windows.net/`)
//! against a real emulator, Azurite, started on loopback (fetched into `target/npmtools` when
//! missing; see `common/emulators.rs`): the scenarios every store runs (`common/suite.rs`),
//! the environment's emulator variables and options over them, every URL spelling, a missing
//! container and a wrong account key. One test function, because the client is configured
//! from the process environment and the last scenario kills the server.

mod common;
#[path = "common/emulators.rs"]
mod emulators;
#[path = "common/suite.rs"]
mod suite;

use common::*;
use emulators::*;
use gantry::{Checkpoint, Config, Loader};
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use suite::*;

struct Azure {
    server: Emulator,
    client: MicrosoftAzure,
    runtime: tokio::runtime::Runtime,
}

impl Store for Azure {
    fn url(&self, key: &str) -> String {
        format!("az://{AZURE_CONTAINER}/{key}")
    }
    fn put(&self, key: &str, bytes: &[u8]) {
        let payload = PutPayload::from(bytes.to_vec());
        // The key as it is (`ObjectPath::from` would escape reserved characters).
        let key = ObjectPath::parse(key).unwrap();
        self.runtime.block_on(self.client.put(&key, payload)).unwrap();
    }
    fn kill(&mut self) {
        self.server.stop();
    }
}

/// A config that reaches Azurite through options alone, as an account at an endpoint.
fn by_options(endpoint: &str, key: &str) -> Config {
    Config::default()
        .object_option("azure_storage_use_emulator", "false")
        .object_option("azure_storage_endpoint", format!("{endpoint}/{AZURE_ACCOUNT}"))
        .object_option("azure_storage_account_name", AZURE_ACCOUNT)
        .object_option("azure_storage_account_key", key)
        .object_option("azure_allow_http", "true")
}

#[test]
fn azure_blob_storage_against_azurite() {
    let Some(bin) = azurite() else { return };
    let server = start_azurite(&bin);
    let endpoint = server.endpoint();
    let client = MicrosoftAzureBuilder::new()
        .with_account(AZURE_ACCOUNT)
        .with_access_key(AZURE_KEY)
        .with_endpoint(format!("{endpoint}/{AZURE_ACCOUNT}"))
        .with_allow_http(true)
        .with_container_name(AZURE_CONTAINER)
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let store = Azure { server, client, runtime };
    // The variables Azure's own tools read for the emulator (its well-known account and key).
    std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
    std::env::set_var("AZURITE_BLOB_STORAGE_URL", &endpoint);
    let dir = scratch();
    let config = Config::default();

    random_layouts(&store, dir.path(), &config);
    let local = upload_sharded(&store, dir.path());
    sharded(&store, &config, &local);
    odd_keys(&store, dir.path(), &config);
    // Every spelling of the same prefix.
    let loader = Loader::new(config.clone()).unwrap();
    for source in [
        format!("abfs://{AZURE_CONTAINER}/llama/"),
        format!("abfss://{AZURE_CONTAINER}@{AZURE_ACCOUNT}.dfs.core.windows.net/llama/"),
        format!("https://{AZURE_ACCOUNT}.blob.core.windows.net/{AZURE_CONTAINER}/llama/"),
    ] {
        let model = loader.load(&source).unwrap();
        assert_matches_local(&model, &local);
        let file = model.report().files[0].path.to_str().unwrap().to_owned();
        assert!(file.starts_with(&source), "{file} is not under {source}");
    }

    // An https:// URL is a web address: its key is percent-encoded, as the portal writes it
    // (here `odd é ~[1]+%#?/café.safetensors`, uploaded by `odd_keys`).
    let https = format!("https://{AZURE_ACCOUNT}.blob.core.windows.net/{AZURE_CONTAINER}/");
    let encoded = format!("{https}odd%20%C3%A9%20~%5B1%5D%2B%25%23%3F/caf%C3%A9.safetensors");
    let local_odd = Checkpoint::open(dir.path().join("odd/caf\u{e9}.safetensors")).unwrap();
    let model = loader.load(&encoded).unwrap();
    assert_matches_local(&model, &local_odd);
    assert_eq!(model.report().files[0].path.to_str(), Some(encoded.as_str()));
    let e = loader.load(format!("{https}odd/100%.safetensors")).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("%25"), "{e}");

    // Options go over the environment: with the emulator variable pointing nowhere, an
    // endpoint, account and key given as options reach the server.
    std::env::set_var("AZURITE_BLOB_STORAGE_URL", "http://127.0.0.1:9");
    sharded(&store, &by_options(&endpoint, AZURE_KEY), &local);
    let bad = Config::default().object_option("azure_no_such_option", "1");
    assert!(Loader::new(bad).map(|_| ()).unwrap_err().to_string().contains("azure_no_such_option"));

    // A wrong account key: an error naming the object, and the key nowhere in it.
    let wrong = base64_encode(b"not-the-account-key-but-64-bytes-long-0123456789abcdef0123456789");
    let e = expect_err(
        &by_options(&endpoint, &wrong),
        &store.url("cases/case0.safetensors"),
        &["cases/case0.safetensors"],
        &wrong,
    );
    assert!(
        matches!(&e, gantry::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied),
        "{e}"
    );
    std::env::set_var("AZURITE_BLOB_STORAGE_URL", &endpoint);

    // Missing container, key, shard; a corrupt header.
    let container = format!("az://no-such-container-{}/m.safetensors", std::process::id());
    expect_err(&config, &container, &["no-such-container"], AZURE_KEY);
    missing(&store, dir.path(), &config, AZURE_KEY);
    header_lengths(&store, dir.path(), &config, AZURE_KEY);

    rewritten_mid_load(&store, dir.path(), &config);
    rewritten_after_open(&store, dir.path(), &config);
    cache_and_sha256(&store, dir.path(), &config, &local);
    killed_mid_load(store, dir.path(), &config);
}
