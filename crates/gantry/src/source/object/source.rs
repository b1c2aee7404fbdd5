//! Object sources as users write them, split into the store they live in, the bucket (or
//! container) and the key; and back: the URL of another key beside them, in the spelling the
//! user chose, so that errors and reports name objects as the user would.
//!
//! Recognised: `s3://bucket/key`, `gs://bucket/key` (also `gcs://`), `az://container/key`
//! (also `abfs://`, `abfss://`, `azure://`), `abfs[s]://container@ACCOUNT.dfs.core.windows.net/key`
//! and `https://ACCOUNT.blob.core.windows.net/container/key` (or `.dfs.`). Schemes and Azure
//! hosts are read in any case, an Azure host with or without `:443`. A key that is empty or
//! ends in `/` is a prefix. Pure string work, no I/O.
//!
//! The rules: a key is taken as it is written, so that every key a store can hold can be
//! named (`%`, `?`, `#`, spaces are part of it); only an `https://` URL, a web address, is
//! percent-decoded. Text that starts like a URL (`scheme://`) is never a local path: a scheme
//! that names no store is an error saying what to write. Bucket, container and account names
//! are checked here ([`super::settings`]), before any client sees them.

use std::path::{Path, PathBuf};

use super::settings;
use crate::error::{Error, Result};

/// Which object store a source lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    /// Amazon S3 or an S3-compatible store.
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

impl Provider {
    /// The name users know the store by, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::S3 => "S3",
            Self::Gcs => "Google Cloud Storage",
            Self::Azure => "Azure Blob Storage",
        }
    }
}

/// Schemes that name an Azure container as their host (fsspec's spellings).
const AZURE_SCHEMES: [&str; 4] = ["az", "abfs", "abfss", "azure"];
/// Host suffixes of Azure storage accounts.
const AZURE_HOSTS: [&str; 2] = [".blob.core.windows.net", ".dfs.core.windows.net"];

/// An object source, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The store.
    pub provider: Provider,
    /// The Azure storage account, when the URL names it.
    pub account: Option<String>,
    /// The bucket (S3, GCS) or container (Azure).
    pub bucket: String,
    /// The key (or prefix) inside it.
    pub key: String,
    /// The URL of key `""` in the bucket, as the user spelled it (`gs://bucket/`).
    base: String,
    /// Whether keys are percent-encoded in this spelling (`https://`).
    encoded: bool,
}

impl Source {
    /// `text` split, `Ok(None)` when it names no object (a local path); an error naming the
    /// URL when it uses an object scheme but names no bucket or account.
    pub fn parse(text: &str) -> Result<Option<Source>> {
        let Some((scheme, rest)) = text.split_once("://") else { return Ok(None) };
        if !is_scheme(scheme) {
            return Ok(None);
        }
        let lower = scheme.to_ascii_lowercase();
        let (authority, key) = rest.split_once('/').unwrap_or((rest, ""));
        let bad = |what: &str| {
            Err(Error::Config(format!("'{text}' names no {what} ({})", example(&lower))))
        };
        let provider = provider_of(text, &lower, authority)?;
        let (account, bucket, key) = if lower == "https" {
            // https://ACCOUNT.blob.core.windows.net/container/key
            let (container, key) = key.split_once('/').unwrap_or((key, ""));
            (azure_account(authority), container, key)
        } else if let Some((container, host)) = authority.split_once('@') {
            // abfss://container@ACCOUNT.dfs.core.windows.net/key
            match azure_account(host) {
                Some(account) if provider == Provider::Azure => (Some(account), container, key),
                _ => return bad("bucket"),
            }
        } else {
            (None, authority, key)
        };
        let account = account.as_deref();
        let bucket_word = if provider == Provider::Azure { "container" } else { "bucket" };
        for (name, what) in [(account.unwrap_or("-"), "storage account"), (bucket, bucket_word)] {
            if name.is_empty() {
                return bad(what);
            }
            if let Some(problem) = settings::name_problem(name, what) {
                return Err(Error::Config(format!("'{text}': {problem} ({})", example(&lower))));
            }
        }
        let mut base = text[..text.len() - key.len()].to_owned();
        if !base.ends_with('/') {
            base.push('/');
        }
        // An https:// URL is a web address: its key is percent-encoded, as the portal and
        // every HTTP tool write it. The other schemes take the key as it is written.
        let encoded = lower == "https";
        let key = if encoded {
            percent_decode(key).ok_or_else(|| {
                Error::Config(format!(
                    "'{text}': the key of an https:// URL is percent-encoded, and '{key}' has a \
                     '%' that is not followed by two hex digits of UTF-8 (write '%' as %25)"
                ))
            })?
        } else {
            key.to_owned()
        };
        Ok(Some(Source {
            provider,
            account: account.map(str::to_owned),
            bucket: bucket.to_owned(),
            key,
            base,
            encoded,
        }))
    }

    /// The URL of `key` in the same bucket, spelled as the source was (percent-encoded in an
    /// https:// URL).
    pub fn url_of(&self, key: &str) -> PathBuf {
        if self.encoded {
            PathBuf::from(format!("{}{}", self.base, percent_encode(key)))
        } else {
            PathBuf::from(format!("{}{key}", self.base))
        }
    }

    /// Whether the key names a prefix (a checkpoint folder) rather than one object.
    pub fn is_prefix(&self) -> bool {
        self.key.is_empty() || self.key.ends_with('/')
    }
}

/// Whether `source` names an object rather than a local path.
pub fn is_url(source: &Path) -> bool {
    source.to_str().is_some_and(|s| matches!(Source::parse(s), Ok(Some(_)) | Err(_)))
}

/// Whether `text` is a URL scheme (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`);
/// text before `://` that is none (`/data/s3`) makes a local path.
fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The store a URL of scheme `lower` (lower case) and `authority` is in; an error saying what
/// to write for a URL that is no object source (never a local path: the text is a URL).
fn provider_of(text: &str, lower: &str, authority: &str) -> Result<Provider> {
    let azure = azure_account(authority).is_some();
    let why = match lower {
        "s3" => return Ok(Provider::S3),
        "gs" | "gcs" => return Ok(Provider::Gcs),
        s if AZURE_SCHEMES.contains(&s) => return Ok(Provider::Azure),
        "https" if azure => return Ok(Provider::Azure),
        "http" if azure => "Azure Blob Storage is reached over https://".to_owned(),
        "http" | "https" => "gantry reads https:// URLs of Azure storage accounts only \
            (https://ACCOUNT.blob.core.windows.net/container/key); for an S3-compatible store \
            write s3://bucket/key and give its endpoint (--s3-endpoint, aws_endpoint_url)"
            .to_owned(),
        _ => {
            let scheme = &text[..lower.len()];
            format!(
                "the scheme '{scheme}://' is not one gantry reads: object sources are s3://, \
                 gs:// (or gcs://), az:// (or abfs://, abfss://, azure://) and \
                 https://ACCOUNT.blob.core.windows.net/; a local path is written without one"
            )
        }
    };
    Err(Error::Config(format!("'{text}' is not an object source: {why}")))
}

/// The storage account of Azure host `host` (`ACCOUNT.blob.core.windows.net` or `.dfs.`, in
/// any case, with or without the port `:443`), lower case; `None` for any other host.
fn azure_account(host: &str) -> Option<String> {
    let host = host.strip_suffix(":443").unwrap_or(host).to_ascii_lowercase();
    let account = AZURE_HOSTS.iter().find_map(|h| host.strip_suffix(h))?;
    Some(account.to_owned())
}

/// `text` with every `%XY` decoded; `None` when an escape is malformed or the bytes are not
/// UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `key` percent-encoded for a URL path: every byte but letters, digits, `-._~` and `/`.
fn percent_encode(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn example(scheme: &str) -> &'static str {
    match scheme {
        "s3" => "s3://bucket/key",
        "gs" | "gcs" => "gs://bucket/key",
        "https" => "https://ACCOUNT.blob.core.windows.net/container/key",
        _ => "az://container/key",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        use Provider::*;
        /// Provider, account, bucket, key, and the URL of key `k` beside it.
        type Split<'a> = (Provider, Option<&'a str>, &'a str, &'a str, &'a str);
        let cases: [(&str, Option<Split>); 14] = [
            ("s3://b/m/x.safetensors", Some((S3, None, "b", "m/x.safetensors", "s3://b/k"))),
            ("s3://b", Some((S3, None, "b", "", "s3://b/k"))),
            ("gs://b/m/", Some((Gcs, None, "b", "m/", "gs://b/k"))),
            ("az://c/m/x", Some((Azure, None, "c", "m/x", "az://c/k"))),
            ("abfs://c/", Some((Azure, None, "c", "", "abfs://c/k"))),
            (
                "abfss://c@acct.dfs.core.windows.net/m/",
                Some((Azure, Some("acct"), "c", "m/", "abfss://c@acct.dfs.core.windows.net/k")),
            ),
            (
                "https://acct.blob.core.windows.net/c/m/x",
                Some((Azure, Some("acct"), "c", "m/x", "https://acct.blob.core.windows.net/c/k")),
            ),
            ("S3://b/m/", Some((S3, None, "b", "m/", "S3://b/k"))),
            ("gcs://b/x", Some((Gcs, None, "b", "x", "gcs://b/k"))),
            (
                "https://ACCT.Blob.Core.Windows.NET:443/c/m/",
                Some((
                    Azure,
                    Some("acct"),
                    "c",
                    "m/",
                    "https://ACCT.Blob.Core.Windows.NET:443/c/k",
                )),
            ),
            (
                "ABFSS://c@Acct.DFS.core.windows.net:443/m",
                Some((Azure, Some("acct"), "c", "m", "ABFSS://c@Acct.DFS.core.windows.net:443/k")),
            ),
            ("model/x.safetensors", None),
            ("/abs/s3://x", None),
            ("./1x://y", None),
        ];
        for (text, want) in cases {
            let got = Source::parse(text).unwrap();
            let got = got.as_ref().map(|s| {
                let url = s.url_of("k");
                (s.provider, s.account.as_deref(), s.bucket.as_str(), s.key.as_str(), url)
            });
            let want = want.map(|(p, a, b, k, u)| (p, a, b, k, PathBuf::from(u)));
            assert_eq!(got, want, "{text}");
            assert_eq!(is_url(Path::new(text)), want.is_some(), "{text}");
        }
    }

    #[test]
    fn keys_as_written_except_in_https_urls() {
        let cases = [
            ("s3://b/a%20b/caf\u{e9} ~[1]+#?.safetensors", "a%20b/caf\u{e9} ~[1]+#?.safetensors"),
            ("gs://b/100%", "100%"),
            ("az://c/%zz", "%zz"),
            ("https://acct.blob.core.windows.net/c/a%20b/caf%C3%A9%3F", "a b/caf\u{e9}?"),
            ("https://acct.blob.core.windows.net/c/%2541", "%41"),
        ];
        for (text, key) in cases {
            let source = Source::parse(text).unwrap().unwrap();
            assert_eq!(source.key, key, "{text}");
            // The URL of its own key is the text again (encoded alike).
            let again = source.url_of(key);
            let decoded = Source::parse(again.to_str().unwrap()).unwrap().unwrap();
            assert_eq!(decoded.key, key, "{text}");
        }
        let https = Source::parse("https://acct.blob.core.windows.net/c/").unwrap().unwrap();
        let url = https.url_of("x y/caf\u{e9}%");
        assert_eq!(url, PathBuf::from("https://acct.blob.core.windows.net/c/x%20y/caf%C3%A9%25"));
        for bad in ["/c/100%", "/c/%4", "/c/%zz", "/c/%+1", "/c/%FF"] {
            let text = format!("https://acct.blob.core.windows.net{bad}");
            let e = Source::parse(&text).unwrap_err().to_string();
            assert!(e.contains(&text) && e.contains("%25"), "{e}");
        }
    }

    #[test]
    fn bad_sources_are_named() {
        for text in [
            "s3:///key",
            "gs://",
            "az:///m/x",
            "https://acct.blob.core.windows.net/",
            "https://acct.blob.core.windows.net//x",
            "gs://c@acct.dfs.core.windows.net/x",
            "abfss://c@example.com/x",
            "abfss://@acct.dfs.core.windows.net/x",
            "s3://../x",
            "https://example.com/c/m/x",
            "http://acct.blob.core.windows.net/c/x",
            "file:///x",
            "ftp://host/x",
            "hf://org/model",
            "https://acct.blob.core.windows.net:8443/c/x",
        ] {
            let e = Source::parse(text).unwrap_err().to_string();
            assert!(e.contains(text), "{e}");
            assert!(is_url(Path::new(text)), "{text}");
        }
    }
}
