//! `SHA256SUMS` parsing against what GNU `sha256sum` writes (and what `sha256sum -c` accepts),
//! with `sha2` over a plain read of each file as the reference digest.

use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::process::Command;

use sha2::Digest as _;

use super::super::to_hex;
use super::*;

/// Names `sha256sum` escapes, and names it writes as they are.
const NAMES: &[&str] = &[
    "model-00001.safetensors",
    "with space.safetensors",
    " leading space.safetensors",
    "new\nline.safetensors",
    "back\\slash.safetensors",
    "carriage\rreturn.safetensors",
    "star*.safetensors",
    "(paren) = x.safetensors",
    "é.safetensors",
];

fn sha256sum(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("sha256sum")
        .args(args)
        .args(NAMES)
        .current_dir(dir)
        .output()
        .expect("sha256sum (coreutils) must be installed: apt-get install coreutils");
    assert!(out.status.success(), "sha256sum {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// GNU's own verdict on `sums` in `dir`.
fn gnu_checks(dir: &Path, sums: &[u8]) -> bool {
    std::fs::write(dir.join("SUMS"), sums).unwrap();
    let mut check = Command::new("sha256sum");
    check.args(["--strict", "-c", "SUMS"]).current_dir(dir);
    check.output().unwrap().status.success()
}

#[test]
fn every_format_sha256sum_writes_gives_the_digest_of_each_file() {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in NAMES.iter().enumerate() {
        std::fs::write(dir.path().join(name), format!("file {i}")).unwrap();
    }
    let text = sha256sum(dir.path(), &[]);
    let binary = sha256sum(dir.path(), &["-b"]);
    let tag = sha256sum(dir.path(), &["--tag"]);
    let bom = [b"\xef\xbb\xbf".as_slice(), &text].concat();
    let indented: Vec<u8> = String::from_utf8(tag.clone())
        .unwrap()
        .split_inclusive('\n')
        .flat_map(|l| format!("  \t{}", l.replace('\n', "\r\n")).into_bytes())
        .collect();
    let commented = [b"# made by sha256sum\n\n".as_slice(), &text, b"\n"].concat();
    for (what, sums) in [
        ("sha256sum", &text),
        ("sha256sum -b", &binary),
        ("sha256sum --tag", &tag),
        ("a byte-order mark", &bom),
        ("leading white space and CRLF", &indented),
        ("comments and empty lines", &commented),
    ] {
        let parsed = parse(sums).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(parsed.len(), NAMES.len(), "{what}");
        for name in NAMES {
            let want: Digest =
                sha2::Sha256::digest(std::fs::read(dir.path().join(name)).unwrap()).into();
            assert_eq!(parsed.get(name.as_bytes()), Some(want), "{what}: {name:?}");
            let dotted = [b"./".as_slice(), Path::new(name).as_os_str().as_bytes()].concat();
            assert_eq!(parsed.get(&dotted), Some(want), "{what}: ./{name:?}");
        }
        assert_eq!(parsed.get(b"model-00002.safetensors"), None, "{what}");
        if what != "a byte-order mark" {
            // GNU itself reads every one of these (coreutils 9.1 does not skip a BOM).
            assert!(gnu_checks(dir.path(), sums), "{what}: sha256sum -c refuses it");
        }
    }
}

#[test]
fn malformed_lines_and_duplicates_are_errors_naming_the_line() {
    let a = "a".repeat(64);
    let b = "b".repeat(64);
    let cases: &[(&str, String)] = &[
        ("line 2", format!("{a}  x\nnot a line\n")),
        ("line 1", format!("{}  x\n", &a[1..])),
        ("line 1", format!("{}g  x\n", &a[1..])),
        ("line 1", format!("{a}x  x\n")),
        ("line 1", format!("MD5 (x) = {a}\n")),
        ("line 1", format!("SHA256 (x) {a}\n")),
        ("line 1", format!("SHA256 (x) = {}\n", &a[2..])),
        ("line 1", format!("\\{a}  x\\y\n")),
        ("line 1", format!("{a}\n")),
        ("line 3", format!("{a}  x\n{b}  y\n{b}  x\n")),
        ("line 2", format!("{a}  x\n{b} *./x\n")),
        ("line 2", format!("SHA256 (x) = {a}\n{b}  x\n")),
        ("line 2", format!("{a}  x\n{b} y\n")),
    ];
    for (line, text) in cases {
        let e = parse(text.as_bytes()).expect_err(text);
        assert!(e.starts_with(&format!("{line}:")), "{text:?}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let good = format!("{}  x\n", to_hex(&sha2::Sha256::digest(b"x").into()));
    std::fs::write(dir.path().join("x"), "x").unwrap();
    assert!(gnu_checks(dir.path(), good.as_bytes()));
    assert!(!gnu_checks(dir.path(), format!("{good}not a line\n").as_bytes()), "GNU --strict");
}

#[test]
fn the_reversed_bsd_form_reads_on_its_own() {
    let a = "a".repeat(64);
    let parsed = parse(format!("{a} x y\n{a} *z\n").as_bytes()).unwrap();
    let want = from_hex(&a);
    assert_eq!(parsed.get(b"x y"), want);
    assert_eq!(parsed.get(b"*z"), want, "reversed lines have no type indicator");
}
