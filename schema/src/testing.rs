//! Test helpers shared by the crates' tests (feature `test-util`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::model::MetricList;

/// A file under the repository's `fixtures/`.
pub fn fixture_path(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(path)
}

/// Reads one or more concatenated OCF files with Python's fastavro (an Avro
/// implementation this project did not write) and returns the records.
/// Panics with a clear message when python3 or fastavro is missing: the
/// README's test command installs them.
pub fn fastavro_read(bytes: &[u8]) -> Vec<MetricList> {
    let mut child = Command::new("python3")
        .arg(fixture_path("wire/read_with_fastavro.py"))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed (see scripts/test)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(bytes)
        .expect("writing to fastavro");
    let out = child.wait_with_output().expect("fastavro ran");
    assert!(
        out.status.success(),
        "fastavro could not read the bytes (is it installed? pip install -r scripts/requirements-test.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 JSON lines")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a MetricList per line"))
        .collect()
}

/// The records of a `*.expected.jsonl` fixture.
pub fn expected_records(name: &str) -> Vec<MetricList> {
    std::fs::read_to_string(fixture_path(&format!("wire/{name}")))
        .expect("fixture exists")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a MetricList per line"))
        .collect()
}
