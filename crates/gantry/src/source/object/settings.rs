//! What a user types to reach a store, checked before any client is built: endpoints and the
//! other URL-valued settings (options and environment variables), regions, and the names of
//! buckets, containers and accounts.
//!
//! The `object_store` clients take these values as strings and use them only when a request
//! is made; some of them then panic (an endpoint with no scheme or with a space, a bucket with
//! a space: the request URL cannot be built) and others become a bare `builder error` long
//! after the setting was given. So every such value is checked here, at the edge, with an
//! error that names the setting, says what is wrong and how to write it. The rules are
//! deliberately plain: an endpoint is `http://` or `https://`, a host and an optional port and
//! path, only characters a URL may hold, no query; a proxy may also be `socks5://`; a region
//! or a bucket, container or account name is letters, digits and `-`, `_`, `.`. Anything
//! stricter (S3's 63-character bucket names, Azure's lower-case accounts) is the store's to
//! say, in its own error. A URL shown in a message never shows its user and password.
//!
//! The one mapping from an endpoint flag to the client's settings ([`endpoint_options`]) lives
//! here too, so that the CLI, Python and C all mean the same by "the S3 endpoint".

use object_store::aws::AmazonS3ConfigKey as S3Key;
use object_store::azure::AzureConfigKey as AzureKey;
use object_store::gcp::GoogleConfigKey as GcsKey;
use object_store::ClientConfigKey as ClientKey;

use super::client::{option_key, OptionKey};
use super::source::Provider;
use crate::error::{Error, Result};

/// What a setting's value must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `http[s]://HOST[:PORT][/PATH]`.
    Endpoint,
    /// A proxy: an endpoint, or `socks5[h]://`.
    Proxy,
    /// A region: letters, digits, `-`, `_`, `.`.
    Region,
    /// A bucket, container or account name.
    Name,
    /// Anything: the client checks it, or it is not used in a URL.
    Free,
}

/// The kind of value option `key` takes.
fn kind(key: &OptionKey) -> Kind {
    match key {
        OptionKey::S3(
            S3Key::Endpoint
            | S3Key::S3Endpoint
            | S3Key::StsEndpoint
            | S3Key::MetadataEndpoint
            | S3Key::ContainerCredentialsFullUri,
        )
        | OptionKey::Gcs(GcsKey::BaseUrl)
        | OptionKey::Azure(
            AzureKey::Endpoint
            | AzureKey::MsiEndpoint
            | AzureKey::AuthorityHost
            | AzureKey::FabricTokenServiceUrl,
        ) => Kind::Endpoint,
        OptionKey::S3(S3Key::Region | S3Key::DefaultRegion) => Kind::Region,
        OptionKey::S3(S3Key::Bucket)
        | OptionKey::Gcs(GcsKey::Bucket)
        | OptionKey::Azure(AzureKey::AccountName | AzureKey::ContainerName) => Kind::Name,
        OptionKey::S3(S3Key::Client(ClientKey::ProxyUrl))
        | OptionKey::Gcs(GcsKey::Client(ClientKey::ProxyUrl))
        | OptionKey::Azure(AzureKey::Client(ClientKey::ProxyUrl))
        | OptionKey::Client(ClientKey::ProxyUrl) => Kind::Proxy,
        _ => Kind::Free,
    }
}

/// Checks object-storage option `key`'s `value` ([`crate::Config::object_option`]): an
/// unknown key, an endpoint or proxy that is no URL, a region or name with characters it
/// cannot have; the error names the option.
pub fn check_option(key: &str, value: &str) -> Result<()> {
    check_setting(&format!("object-storage option {key}"), &option_key(key)?, value)
}

/// Checks `value` for client setting `key`; the error begins with `origin` (the option or
/// environment variable it came from).
pub(crate) fn check_setting(origin: &str, key: &OptionKey, value: &str) -> Result<()> {
    check(kind(key), value).map_err(|why| Error::Config(format!("{origin}: {why}")))
}

/// Checks endpoint `value`; the error begins with `origin`.
pub(crate) fn check_endpoint(origin: &str, value: &str) -> Result<()> {
    check(Kind::Endpoint, value).map_err(|why| Error::Config(format!("{origin}: {why}")))
}

/// The client settings that point `provider`'s client at `url` (the CLI's `--s3-endpoint`,
/// `--gcs-endpoint`, `--azure-endpoint`, Python's `s3_endpoint`, ...): its endpoint key
/// (`aws_endpoint_url`, `google_base_url`, `azure_storage_endpoint`) and, for an `http://`
/// URL, the key that allows plain HTTP. An error saying how to write the URL when it is none.
pub fn endpoint_options(provider: Provider, url: &str) -> Result<Vec<(String, String)>> {
    let (key, allow_http) = match provider {
        Provider::S3 => ("aws_endpoint_url", "aws_allow_http"),
        Provider::Gcs => ("google_base_url", "google_allow_http"),
        Provider::Azure => ("azure_storage_endpoint", "azure_allow_http"),
    };
    check(Kind::Endpoint, url).map_err(|why| {
        Error::Config(format!("the {} endpoint (option {key}): {why}", provider.name()))
    })?;
    let mut options = vec![(key.to_owned(), url.to_owned())];
    if url.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) {
        options.push((allow_http.to_owned(), "true".to_owned()));
    }
    Ok(options)
}

/// Why `name` cannot be a bucket (container, account) name, if it cannot; `what` names it.
pub(crate) fn name_problem(name: &str, what: &str) -> Option<String> {
    check(Kind::Name, name).err().map(|why| format!("the {what} name {why}"))
}

/// `Ok` when `value` is of `kind`, else why not (naming the value, its user and password cut
/// out) and how to write it.
fn check(kind: Kind, value: &str) -> std::result::Result<(), String> {
    let problem = match kind {
        Kind::Free => None,
        Kind::Endpoint => url_problem(value, &["http", "https"]).map(|p| {
            format!("{p}; write it as http://HOST:PORT or https://HOST, with an optional /PATH")
        }),
        Kind::Proxy => url_problem(value, &["http", "https", "socks5", "socks5h"])
            .map(|p| format!("{p}; write it as http://HOST:PORT (or https://, socks5://)")),
        Kind::Region | Kind::Name => name_chars(value),
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(format!("'{}' {p}", shown(value))),
    }
}

/// Why `value` is not a region or name: letters, digits, `-`, `_`, `.`, at most 255 bytes.
fn name_chars(value: &str) -> Option<String> {
    if value.is_empty() || value == "." || value == ".." {
        return Some("is empty or a dot; it must be letters, digits, '-', '_' and '.'".into());
    }
    if value.len() > 255 {
        return Some(format!("is {} bytes long, more than 255", value.len()));
    }
    let bad = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
    bad.map(|c| format!("has the character {c:?}; it must be letters, digits, '-', '_' and '.'"))
}

/// Why `text` is not a URL of one of `schemes` with a host, if it is not.
fn url_problem(text: &str, schemes: &[&str]) -> Option<String> {
    if let Some(c) = text.chars().find(|&c| !url_char(c)) {
        return Some(format!("has the character {c:?}, which a URL cannot hold"));
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Some("is not a URL: it has no scheme".into());
    };
    if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        let known = schemes.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", ");
        return Some(format!("has the scheme '{scheme}://', which is not one of {known}"));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest[end..].contains(['?', '#']) {
        return Some("has a query or fragment ('?', '#'), which an endpoint cannot have".into());
    }
    host_problem(&rest[..end])
}

/// Why `authority` (`[USER@]HOST[:PORT]`) names no host, if it does not.
fn host_problem(authority: &str) -> Option<String> {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.strip_prefix('[') {
        // An IPv6 address: `[::1]:9000`.
        Some(v6) => match v6.split_once(']') {
            Some((address, rest)) if !address.is_empty() => {
                if !address.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
                    return Some(format!("has an IPv6 address '[{address}]' that is none"));
                }
                match rest.strip_prefix(':') {
                    Some(port) => (address, Some(port)),
                    None if rest.is_empty() => (address, None),
                    None => return Some("has text after its IPv6 address".into()),
                }
            }
            _ => return Some("has an IPv6 address with no closing ']'".into()),
        },
        None => match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Some("names no host".into());
    }
    if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')) {
        return Some(format!("has a host '{host}' that is no host name or address"));
    }
    match port {
        Some(p) if p.is_empty() || p.parse::<u16>().is_err() => {
            Some(format!("has a port '{p}' that is not a number from 0 to 65535"))
        }
        _ => None,
    }
}

/// Whether `c` may appear in a URL as written (RFC 3986: unreserved, reserved and `%`).
fn url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(c)
}

/// `value` as shown in a message: a URL's `user:password@` cut out.
fn shown(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else { return value.to_owned() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://[redacted]@{host}{}", &rest[end..]),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let good = [
            "http://127.0.0.1:9000",
            "https://s3.example.com",
            "HTTP://minio:9000/",
            "http://[::1]:9000/base/path",
            "http://127.0.0.1:10000/devstoreaccount1",
            "https://storage.googleapis.com",
        ];
        for url in good {
            assert!(endpoint_options(Provider::S3, url).is_ok(), "{url}");
        }
        let bad = [
            ("not a url", "' '"),
            ("127.0.0.1:9000", "no scheme"),
            ("s3.example.com", "no scheme"),
            ("ftp://127.0.0.1:9", "'ftp://'"),
            ("http://", "no host"),
            ("http:///path", "no host"),
            ("http://host:port", "port 'port'"),
            ("http://host:99999", "port '99999'"),
            ("http://host:", "port ''"),
            ("http://host/a b", "' '"),
            ("http://host?x=1", "query"),
            ("http://[::1", "closing"),
            ("http://exa\u{e9}mple.com", "'\u{e9}'"),
            ("", "no scheme"),
            (" http://host", "' '"),
        ];
        for (url, want) in bad {
            let e = endpoint_options(Provider::Gcs, url).unwrap_err().to_string();
            assert!(e.contains("google_base_url") && e.contains(want), "{url}: {e}");
            assert!(e.contains("http://HOST:PORT"), "{url}: {e}");
        }
    }

    #[test]
    fn endpoint_options_allow_plain_http_only_for_http() {
        let pairs = |p, u| endpoint_options(p, u).unwrap();
        let owned = |v: &[(&str, &str)]| {
            v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>()
        };
        assert_eq!(
            pairs(Provider::S3, "http://h:1"),
            owned(&[("aws_endpoint_url", "http://h:1"), ("aws_allow_http", "true")])
        );
        assert_eq!(
            pairs(Provider::Azure, "HTTP://h:1/acct"),
            owned(&[("azure_storage_endpoint", "HTTP://h:1/acct"), ("azure_allow_http", "true")])
        );
        assert_eq!(pairs(Provider::Gcs, "https://h"), owned(&[("google_base_url", "https://h")]));
    }

    #[test]
    fn options_are_checked_by_what_they_hold() {
        let good = [
            ("aws_endpoint_url", "http://127.0.0.1:9000"),
            ("endpoint", "https://s3.example.com"),
            ("proxy_url", "socks5://127.0.0.1:1080"),
            ("aws_proxy_url", "http://user:pw@proxy:3128"),
            ("aws_region", "us-east-1"),
            ("timeout", "30s"),
            ("azure_storage_account_name", "devstoreaccount1"),
            ("aws_secret_access_key", "any thing/at+all="),
        ];
        for (key, value) in good {
            assert!(check_option(key, value).is_ok(), "{key}={value}");
        }
        let bad = [
            ("aws_endpoint_url", "not a url"),
            ("AWS_ENDPOINT", "127.0.0.1:9000"),
            ("aws_endpoint_url_s3", "ftp://x"),
            ("aws_metadata_endpoint", "nowhere"),
            ("google_base_url", "not a url"),
            ("azure_storage_endpoint", "not a url"),
            ("azure_msi_endpoint", "x y"),
            ("proxy_url", "not a url"),
            ("google_proxy_url", "ftp://proxy"),
            ("aws_region", "us east 1"),
            ("azure_storage_account_name", "my account"),
            ("aws_bucket", "my bucket"),
        ];
        for (key, value) in bad {
            let e = check_option(key, value).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(value), "{key}={value}: {e}");
        }
        let e = check_option("proxy_url", "ftp://user:hunter22@proxy").unwrap_err().to_string();
        assert!(!e.contains("hunter22") && e.contains("proxy_url"), "{e}");
    }

    #[test]
    fn names() {
        assert_eq!(name_problem("weights", "bucket"), None);
        assert_eq!(name_problem("my.bucket-1_x", "bucket"), None);
        for name in ["my bucket", "", "..", "a\u{e9}", "a%20b", "a?b"] {
            let e = name_problem(name, "bucket").expect(name);
            assert!(e.starts_with("the bucket name"), "{e}");
        }
    }
}
