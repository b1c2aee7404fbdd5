//! Per file of a load report: the JSON object (`--json`) and the SHA-256 line
//! (`--verify-sha256`), the same for `gantry load`, its ranks and `gantry bench`.

use gantry::LoadReport;
use gantry_format::escape_path;
use serde::Serialize;

#[derive(Serialize)]
pub struct JsonFile {
    pub path: String,
    pub reader: &'static str,
    pub reason: String,
    pub facts: String,
    pub bytes: u64,
    /// With --verify-sha256: the file's SHA-256 (64 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Whether the file's SHA-256 was checked against a known digest (and matched).
    pub sha256_verified: bool,
    /// What the digest was checked against, why nothing was, or that it was not computed.
    pub sha256_check: String,
    /// With --verify-sha256: how the digest was computed (sequentially, or in segments in
    /// parallel from recorded states).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_hashing: Option<String>,
}

pub fn json_files(report: &LoadReport) -> Vec<JsonFile> {
    report
        .files
        .iter()
        .map(|f| JsonFile {
            path: f.path.display().to_string(),
            reader: f.reader.map_or("none", |r| r.name()),
            reason: f.reason.clone(),
            facts: f.facts.clone(),
            bytes: f.read_bytes,
            sha256: f
                .integrity
                .as_ref()
                .and_then(|c| c.sha256.as_ref())
                .map(gantry::integrity::to_hex),
            sha256_verified: f.integrity.as_ref().is_some_and(|c| c.verified()),
            sha256_check: match &f.integrity {
                Some(c) => match &c.known {
                    Some(k) => format!("matches {}", k.source),
                    None => format!("not verified: no digest known ({})", c.unknown_reason),
                },
                None => NOT_CHECKED.to_owned(),
            },
            sha256_hashing: f
                .integrity
                .as_ref()
                .and_then(|c| c.hashing.as_ref())
                .map(ToString::to_string),
        })
        .collect()
}

/// `sha256_check` of a file whose SHA-256 was not computed.
const NOT_CHECKED: &str = "not checked (--verify-sha256 is off, or nothing of the file was read)";

/// With --verify-sha256, one line per file read: its SHA-256, what it was checked against (or
/// that nothing was known to check it against) and how it was hashed.
pub fn print_sha256(report: &LoadReport, indent: &str) {
    for f in &report.files {
        if let Some(check) = &f.integrity {
            println!("{indent}{}: {}", escape_path(&f.path), check.explain());
        }
    }
}

/// With --verify-sha256, the SHA-256 code this machine hashes with, for `--json`:
/// `{"implementation": "sha-ni", "reason": ...}` (see [`gantry::integrity::implementation`]).
pub fn sha256_json(verify_sha256: bool) -> Option<serde_json::Value> {
    verify_sha256.then(|| {
        let i = gantry::integrity::implementation();
        serde_json::json!({ "implementation": i.name(), "reason": i.reason() })
    })
}

/// A verdict as `--json` gives it (`bound_by`): stage, evidence, setting and the line.
pub fn bound_by_json(v: &gantry::trace::Verdict) -> serde_json::Value {
    serde_json::json!({
        "stage": v.bound.name(),
        "evidence": v.evidence,
        "setting": v.setting,
        "line": v.to_string(),
    })
}
