//! The `object_store` clients, one per store, bucket and set of options, made once per
//! process; the runtime their futures run on; and errors that never show a secret.
//!
//! Each provider reads its own environment and keeps its own credential chain: S3 the
//! standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, instance and container
//! credentials); Google Cloud Storage `GOOGLE_SERVICE_ACCOUNT` (a key file),
//! `GOOGLE_SERVICE_ACCOUNT_KEY` (its JSON), `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
//! application default credentials and the metadata server, and `STORAGE_EMULATOR_HOST` (an
//! emulator: no credentials); Azure `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_SAS_KEY`, `AZURE_STORAGE_CLIENT_ID`/`_SECRET`/`_TENANT_ID`, workload and
//! managed identity, the Azure CLI, and `AZURE_STORAGE_USE_EMULATOR` with
//! `AZURITE_BLOB_STORAGE_URL` (Azurite). Options given in the config (`aws_*`, `google_*`,
//! `azure_*` keys, or a client key such as `allow_http` that applies to every store) go over
//! the environment. Every client retries 5xx, throttling and broken connections with backoff.
//!
//! Messages come from the client, which leaves credentials out; as a second guard, every
//! value of a secret option or variable the process handed a client is cut out of them.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{BackoffConfig, ClientConfigKey, ClientOptions, ObjectStore, RetryConfig};
use parking_lot::Mutex;

use super::settings;
use super::source::{Provider, Source};
use crate::error::{Error, Result};

/// The runtime the clients' futures run on: a few threads, shared by every load.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // The workers copy bodies into staging: enough of them to keep up with a fast
            // network, not so many that they crowd the load's other threads.
            let workers = std::thread::available_parallelism().map_or(4, |n| n.get().clamp(2, 8));
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("gantry-object")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Resource {
            what: "starting the object-storage runtime",
            source: io::Error::other(e.clone()),
        })
}

/// Settings of the clients beyond the environment: `object_store` configuration keys and
/// values, applied after the environment's.
pub type Options = [(String, String)];

/// An option's key, and the stores it applies to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OptionKey {
    S3(AmazonS3ConfigKey),
    Gcs(GoogleConfigKey),
    Azure(AzureConfigKey),
    /// HTTP client settings (`allow_http`, `timeout`, `proxy_url`, ...): every store.
    Client(ClientConfigKey),
}

/// The client configuration key for option `key` (case-insensitive): `google_*` keys go to
/// Google Cloud Storage, `azure_*` keys to Azure, `aws_*` keys and the S3 client's other
/// spellings (`endpoint`, `region`) to S3, HTTP client keys to every store; an error naming
/// `key` when no client has it.
pub(crate) fn option_key(key: &str) -> Result<OptionKey> {
    let lower = key.to_ascii_lowercase();
    let parsed = if lower.starts_with("google_") {
        lower.parse().map(OptionKey::Gcs).ok()
    } else if lower.starts_with("azure_") {
        lower.parse().map(OptionKey::Azure).ok()
    } else if lower.starts_with("aws_") {
        lower.parse().map(OptionKey::S3).ok()
    } else {
        lower.parse().map(OptionKey::Client).or_else(|_| lower.parse().map(OptionKey::S3)).ok()
    };
    parsed.ok_or_else(|| {
        Error::Config(format!(
            "unknown object-storage option '{key}' (object_store keys: aws_endpoint_url, \
             aws_region, google_service_account_key, google_base_url, \
             azure_storage_account_name, azure_storage_endpoint, ...; or allow_http, timeout)"
        ))
    })
}

/// A client, and the name its store gives the objects' account for the cache (Azure).
#[derive(Debug, Clone)]
pub struct Client {
    /// The store, for this bucket.
    pub store: Arc<dyn ObjectStore>,
    /// What names this bucket's copies in a cache directory besides key and version: the
    /// provider, the endpoint the client was configured with (normalized; empty for the
    /// provider's default), the account (Azure) and the bucket.
    pub cache_name: crate::source::cache::Origin,
    /// Whether the client may carry several requests on one connection (HTTP/2: its
    /// `http1_only` off or `http2_only` on), where an answer left unread holds up the others.
    pub multiplexed: bool,
}

/// The client for `source`'s bucket with `options`, made once per process. Every setting it
/// is made from (options and environment) is checked first ([`super::settings`]); a panic
/// inside the client's builder, which those checks leave no reason for, is an error too.
pub fn client(source: &Source, options: &Options) -> Result<Client> {
    type Key = (Provider, Option<String>, String, Vec<(String, String)>);
    static CLIENTS: OnceLock<Mutex<HashMap<Key, Client>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let key = (source.provider, source.account.clone(), source.bucket.clone(), options.to_vec());
    if let Some(c) = clients.lock().get(&key) {
        return Ok(c.clone());
    }
    for (key, value) in options {
        remember_secret(key, value);
    }
    let url = source.url_of("");
    let build = || match source.provider {
        Provider::S3 => s3(&source.bucket, options),
        Provider::Gcs => gcs(&source.bucket, options),
        Provider::Azure => azure(source, options),
    };
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
        .map_err(|panic| panicked(&url, panic.as_ref()))?;
    let (store, cache_name, multiplexed) = built.map_err(|e| match e {
        Built::Setting(e) => e,
        Built::Client(e) => Error::Config(format!("{}: {}", url.display(), strip(&e.to_string()))),
    })?;
    let client = Client { store, cache_name, multiplexed };
    clients.lock().insert(key, client.clone());
    Ok(client)
}

/// The error for a panic inside an `object_store` client at `url` (a backstop: the settings
/// are checked before a client is built).
pub(crate) fn panicked(url: &Path, panic: &(dyn std::any::Any + Send)) -> Error {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message");
    Error::Config(format!(
        "{}: the object-storage client failed on its settings ({}); check the endpoint, region \
         and proxy options and the provider's environment variables (AWS_*, GOOGLE_*, AZURE_*)",
        url.display(),
        strip(what)
    ))
}

/// Runs `future` on the clients' runtime; a panic inside the client becomes an error naming
/// `url` rather than unwinding into the caller.
pub fn block_on<F: std::future::Future>(url: &Path, future: F) -> Result<F::Output> {
    use futures::FutureExt;
    let caught = runtime()?.block_on(std::panic::AssertUnwindSafe(future).catch_unwind());
    caught.map_err(|panic| panicked(url, panic.as_ref()))
}

/// Why a client was not built: a setting that fails its check, or the client's own error.
enum Built {
    Setting(Error),
    Client(object_store::Error),
}

impl From<Error> for Built {
    fn from(e: Error) -> Self {
        Self::Setting(e)
    }
}

impl From<object_store::Error> for Built {
    fn from(e: object_store::Error) -> Self {
        Self::Client(e)
    }
}

fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(300))
}

/// One setting of a client: where it came from (for messages), its key, its value.
struct Setting<K> {
    origin: String,
    key: K,
    value: String,
}

/// The settings of one store's client, in the order they apply: the environment's variables
/// starting with `prefix` that `key_of` knows, then the options it knows (secret values are
/// remembered for [`strip`]). Each value that takes effect (the last of its key) is checked.
fn settings<K: Clone + PartialEq>(
    prefix: &str,
    options: &Options,
    key_of: impl Fn(OptionKey) -> Option<K>,
    wrap: impl Fn(K) -> OptionKey,
) -> Result<Vec<Setting<K>>> {
    let mut all = Vec::new();
    for (name, value) in std::env::vars().filter(|(k, _)| k.starts_with(prefix)) {
        let lower = name.to_ascii_lowercase();
        remember_secret(&lower, &value);
        if let Some(key) = option_key(&lower).ok().and_then(&key_of) {
            all.push(Setting { origin: format!("environment variable {name}"), key, value });
        }
    }
    for (name, value) in options {
        if let Some(key) = option_key(name).ok().and_then(&key_of) {
            let origin = format!("object-storage option {name}");
            all.push(Setting { origin, key, value: value.clone() });
        }
    }
    for (i, s) in all.iter().enumerate() {
        if !all[i + 1..].iter().any(|later| later.key == s.key) {
            settings::check_setting(&s.origin, &wrap(s.key.clone()), &s.value)?;
        }
    }
    Ok(all)
}

/// A store, where its bucket lives and whether it may use HTTP/2 ([`Client::multiplexed`]), or
/// why it could not be made.
type Store = std::result::Result<(Arc<dyn ObjectStore>, crate::source::cache::Origin, bool), Built>;

/// Whether a client whose `get` gives these values of its HTTP settings may use HTTP/2 (the
/// client's own reading of a boolean).
fn may_use_http2(get: impl Fn(ClientConfigKey) -> Option<String>) -> bool {
    let on = |key| {
        let value = get(key).unwrap_or_default().to_ascii_lowercase();
        ["1", "true", "on", "yes", "y"].contains(&value.as_str())
    };
    !on(ClientConfigKey::Http1Only) || on(ClientConfigKey::Http2Only)
}

/// The cache's name for `bucket` at `endpoint` (as configured) of `provider`.
fn origin(
    provider: &'static str,
    endpoint: Option<String>,
    account: Option<String>,
    bucket: &str,
) -> crate::source::cache::Origin {
    crate::source::cache::Origin {
        provider,
        endpoint: crate::source::cache::normalize_endpoint(&endpoint.unwrap_or_default()),
        account: account.unwrap_or_default(),
        bucket: bucket.to_owned(),
    }
}

fn s3(bucket: &str, options: &Options) -> Store {
    let key_of = |k| match k {
        OptionKey::S3(k) => Some(k),
        OptionKey::Client(k) => Some(AmazonS3ConfigKey::Client(k)),
        _ => None,
    };
    // Client options first: the environment's (AWS_ALLOW_HTTP, proxies, ...) go into them.
    let mut builder = AmazonS3Builder::new().with_client_options(client_options());
    for s in settings("AWS_", options, key_of, OptionKey::S3)? {
        builder = builder.with_config(s.key, s.value);
    }
    builder = builder.with_bucket_name(bucket).with_retry(retry());
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let http2 = may_use_http2(|k| builder.get_config_value(&AmazonS3ConfigKey::Client(k)));
    Ok((Arc::new(builder.build()?), origin("s3", endpoint, None, bucket), http2))
}

fn gcs(bucket: &str, options: &Options) -> Store {
    let key_of = |k| match k {
        OptionKey::Gcs(k) => Some(k),
        OptionKey::Client(k) => Some(GoogleConfigKey::Client(k)),
        _ => None,
    };
    let settings = settings("GOOGLE_", options, key_of, OptionKey::Gcs)?;
    let (env, options): (Vec<_>, Vec<_>) =
        settings.into_iter().partition(|s| s.origin.starts_with("environment"));
    let mut builder = GoogleCloudStorageBuilder::new().with_client_options(client_options());
    for s in env {
        builder = builder.with_config(s.key, s.value);
    }
    // The emulator convention of Google's own clients: requests go there, unsigned.
    if let Some(host) = std::env::var("STORAGE_EMULATOR_HOST").ok().filter(|h| !h.is_empty()) {
        let url = if host.contains("://") { host } else { format!("http://{host}") };
        settings::check_endpoint("environment variable STORAGE_EMULATOR_HOST", &url)?;
        let allow_http = GoogleConfigKey::Client(ClientConfigKey::AllowHttp);
        builder = builder.with_base_url(&url).with_skip_signature(true);
        builder = builder.with_config(allow_http, url.starts_with("http://").to_string());
    }
    for s in options {
        builder = builder.with_config(s.key, s.value);
    }
    let endpoint = builder.get_config_value(&GoogleConfigKey::BaseUrl);
    let http2 = may_use_http2(|k| builder.get_config_value(&GoogleConfigKey::Client(k)));
    let store = builder.with_bucket_name(bucket).with_retry(retry()).build()?;
    Ok((Arc::new(store), origin("gcs", endpoint, None, bucket), http2))
}

fn azure(source: &Source, options: &Options) -> Store {
    let key_of = |k| match k {
        OptionKey::Azure(k) => Some(k),
        OptionKey::Client(k) => Some(AzureConfigKey::Client(k)),
        _ => None,
    };
    let mut builder = MicrosoftAzureBuilder::new().with_client_options(client_options());
    let settings = settings("AZURE_", options, key_of, OptionKey::Azure)?;
    let (env, options): (Vec<_>, Vec<_>) =
        settings.into_iter().partition(|s| s.origin.starts_with("environment"));
    for s in env {
        builder = builder.with_config(s.key, s.value);
    }
    if let Ok(endpoint) = std::env::var("IDENTITY_ENDPOINT") {
        settings::check_endpoint("environment variable IDENTITY_ENDPOINT", &endpoint)?;
        builder = builder.with_msi_endpoint(endpoint);
    }
    for s in options {
        builder = builder.with_config(s.key, s.value);
    }
    if let Some(account) = &source.account {
        builder = builder.with_account(account);
    }
    let emulator =
        builder.get_config_value(&AzureConfigKey::UseEmulator).as_deref() == Some("true");
    if let (true, Ok(url)) = (emulator, std::env::var("AZURITE_BLOB_STORAGE_URL")) {
        settings::check_endpoint("environment variable AZURITE_BLOB_STORAGE_URL", &url)?;
    }
    let account = builder.get_config_value(&AzureConfigKey::AccountName);
    let account = account.unwrap_or_else(|| if emulator { "devstoreaccount1" } else { "_" }.into());
    let endpoint = builder.get_config_value(&AzureConfigKey::Endpoint).or_else(|| {
        let url = std::env::var("AZURITE_BLOB_STORAGE_URL").ok();
        emulator.then(|| url.unwrap_or_else(|| "http://127.0.0.1:10000".to_owned()))
    });
    let http2 = may_use_http2(|k| builder.get_config_value(&AzureConfigKey::Client(k)));
    let store = builder.with_container_name(&source.bucket).with_retry(retry()).build()?;
    Ok((Arc::new(store), origin("azure", endpoint, Some(account), &source.bucket), http2))
}

/// Values cut out of every message.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Remembers `value` when `key` names a secret (keys, tokens, SAS, client secrets).
fn remember_secret(key: &str, value: &str) {
    let key = key.to_ascii_lowercase();
    let secret = ["secret", "token", "sas", "password", "_key"].iter().any(|s| key.contains(s))
        && !key.ends_with("_id");
    // Short values ("true", a region) would cut ordinary words out of messages.
    if secret && value.len() >= 8 {
        let mut secrets = SECRETS.lock();
        if !secrets.iter().any(|s| s == value) {
            secrets.push(value.to_owned());
        }
    }
}

/// `text` without anything that looks like a signature or a key, nor any secret value a
/// client was handed.
pub fn strip(text: &str) -> String {
    let mut text = text.to_owned();
    for secret in SECRETS.lock().iter() {
        text = text.replace(secret.as_str(), "[redacted]");
    }
    text.split_whitespace()
        .map(|w| {
            let lower = w.to_ascii_lowercase();
            let signed = ["signature=", "credential=", "x-amz-security-token", "sig="];
            if signed.iter().any(|s| lower.contains(s)) {
                "[redacted]"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The I/O error for a failed request on `url`: not-found and access-denied keep their kinds
/// (the C ABI and Python map them), the message is the client's, stripped of secrets.
pub fn request_error(
    op: &'static str,
    url: &Path,
    offset: u64,
    len: u64,
    e: object_store::Error,
) -> Error {
    let message = strip(&e.to_string());
    if let Some(hint) = no_credentials(url, &message) {
        let source = io::Error::new(io::ErrorKind::PermissionDenied, format!("{hint} ({message})"));
        return Error::Io { op, path: url.to_path_buf(), offset, len, source };
    }
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        object_store::Error::Precondition { .. } => {
            return changed(op, url, offset, len, "its ETag no longer matches");
        }
        _ => io::ErrorKind::Other,
    };
    let source = io::Error::new(kind, message);
    Error::Io { op, path: url.to_path_buf(), offset, len, source }
}

/// Paths of the instance metadata services (EC2 and ECS, Google Compute Engine, Azure
/// managed identity): a client asks them for credentials only when it was given none.
const METADATA_PATHS: [&str; 6] = [
    "/latest/api/token",
    "/latest/meta-data/iam",
    "169.254.170.2",
    "/computeMetadata/",
    "metadata.google.internal",
    "/metadata/identity/oauth2/token",
];

/// When `message` is a failed request for credentials to an instance metadata service (what
/// a client does when it found none, and what a 403 from that address means off a cloud
/// instance): a message that says no credentials were found and how to give them.
fn no_credentials(url: &Path, message: &str) -> Option<String> {
    if !METADATA_PATHS.iter().any(|p| message.contains(p)) {
        return None;
    }
    let provider = url.to_str().and_then(|u| Source::parse(u).ok().flatten())?.provider;
    let how = match provider {
        Provider::S3 => {
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE and \
             AWS_ROLE_ARN), or the options aws_access_key_id and aws_secret_access_key; for a \
             public bucket, aws_skip_signature=true"
        }
        Provider::Gcs => {
            "set GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT (a key file), run \
             'gcloud auth application-default login', or give the option \
             google_service_account_key; for a public bucket, google_skip_signature=true"
        }
        Provider::Azure => {
            "set AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY or AZURE_STORAGE_CLIENT_ID, \
             _SECRET and _TENANT_ID, or the matching azure_* options (azure_use_azure_cli=true \
             for the Azure CLI's login); for a public container, azure_skip_signature=true"
        }
    };
    Some(format!(
        "no {} credentials were found, and the instance metadata service the client then asked \
         gave none: {how}",
        provider.name()
    ))
}

/// The error for an object that changed during a load.
pub fn changed(op: &'static str, url: &Path, offset: u64, len: u64, why: &str) -> Error {
    let source = io::Error::other(format!("the object changed during the load ({why})"));
    Error::Io { op, path: url.to_path_buf(), offset, len, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients that may use HTTP/2 are told apart from the HTTP/1 default, whichever way the
    /// setting is spelled and whichever store it is given to.
    #[test]
    fn clients_that_may_use_http2_are_known() {
        let options = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let cases: [(&[(&str, &str)], bool); 5] = [
            (&[], false),
            (&[("http1_only", "false")], true),
            (&[("http1_only", "Off")], true),
            (&[("http2_only", "YES")], true),
            (&[("http1_only", "true"), ("http2_only", "0")], false),
        ];
        for (i, (pairs, want)) in cases.into_iter().enumerate() {
            for (n, url) in
                ["s3://b-http2/k", "gs://b-http2/k", "az://c-http2/k"].iter().enumerate()
            {
                // A bucket of its own per case: clients are made once per process and options.
                let url = url.replace("http2", &format!("http2-{i}-{n}"));
                let source = Source::parse(&url).unwrap().unwrap();
                let mut options = options(pairs);
                options.push(("azure_storage_account_name".into(), "acct".into()));
                let c = client(&source, &options).unwrap();
                assert_eq!(c.multiplexed, want, "{url} {pairs:?}");
            }
        }
    }

    #[test]
    fn option_keys_go_to_their_store() {
        let cases = [
            ("aws_endpoint_url", Some("S3")),
            ("AWS_REGION", Some("S3")),
            ("endpoint", Some("S3")),
            ("google_service_account_key", Some("Gcs")),
            ("google_base_url", Some("Gcs")),
            ("azure_storage_account_name", Some("Azure")),
            ("azure_storage_use_emulator", Some("Azure")),
            ("allow_http", Some("Client")),
            ("timeout", Some("Client")),
            ("aws_no_such_option", None),
            ("google_no_such_option", None),
            ("azure_no_such_option", None),
            ("no_such_option", None),
        ];
        for (key, want) in cases {
            let got = option_key(key).ok().map(|k| match k {
                OptionKey::S3(_) => "S3",
                OptionKey::Gcs(_) => "Gcs",
                OptionKey::Azure(_) => "Azure",
                OptionKey::Client(_) => "Client",
            });
            assert_eq!(got, want, "{key}");
            if want.is_none() {
                let e = option_key(key).unwrap_err().to_string();
                assert!(e.contains(key), "{e}");
            }
        }
    }

    #[test]
    fn secrets_are_cut_out() {
        remember_secret("azure_storage_account_key", "c2VjcmV0LWtleS0xMjM0NQ==");
        remember_secret("aws_region", "us-east-1-long-enough");
        let text = strip("bad key c2VjcmV0LWtleS0xMjM0NQ== in us-east-1-long-enough Signature=abc");
        assert_eq!(text, "bad key [redacted] in us-east-1-long-enough [redacted]");
    }
}
