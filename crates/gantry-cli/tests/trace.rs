//! `gantry load --trace` and `gantry trace summarize`: the file opens as trace-event JSON,
//! `summarize` reads it back to the verdict `--explain` printed and `--json` carries, and bad
//! trace files are one error line.

use std::path::Path;
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn gantry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry")).args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn write_checkpoint(path: &Path) {
    let data: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8; 300_000 + 4096 * i]).collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("t{i}"), TensorView::new(Dtype::U8, vec![d.len()], d).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn summarize_agrees_with_explain_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    write_checkpoint(&model);
    let (m, trace) = (model.to_str().unwrap(), dir.path().join("t.json"));
    let t = trace.to_str().unwrap();
    let explain = stdout(&gantry(&["load", m, "--explain", "--trace", t, "--threads", "2"]));
    let verdict = explain.lines().last().unwrap().to_owned();
    assert!(verdict.starts_with("bound by "), "{explain}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    for phase in ["headers", "open and probe", "plan", "load"] {
        assert!(events.iter().any(|e| e["cat"] == "phase" && e["name"] == phase), "{phase}");
    }
    let summary = stdout(&gantry(&["trace", "summarize", t]));
    assert_eq!(summary.lines().next().unwrap(), verdict, "{summary}");
    assert!(summary.contains("read latency ("), "{summary}");

    let json = stdout(&gantry(&["load", m, "--json", "--trace", t]));
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    let line = j["bound_by"]["line"].as_str().unwrap().to_owned();
    assert!(line.starts_with(&format!("bound by {}: ", j["bound_by"]["stage"].as_str().unwrap())));
    let summary = stdout(&gantry(&["trace", "summarize", t]));
    assert_eq!(summary.lines().next().unwrap(), line);
    let plain = stdout(&gantry(&["load", m, "--json"]));
    assert!(!plain.contains("bound_by"), "untraced loads have no verdict");
}

#[test]
fn bad_trace_files_are_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [("empty", ""), ("text", "not json"), ("object", "{\"a\":1}"), ("no load", "[]")];
    for (name, text) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = gantry(&["trace", "summarize", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.stdout.is_empty(), "{name}");
        assert!(err.starts_with("error: ") && err.lines().count() == 1, "{name}: {err}");
        assert!(err.contains(path.to_str().unwrap()), "{name}: {err}");
    }
    let out = gantry(&["trace", "summarize", "/nonexistent/t.json"]);
    assert!(!out.status.success());
}
