//! Running the third-party tools the tests compare gridtalk against (installed by
//! `scripts/install-test-tools`): each is a Python script in this directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python that has the tools: `GRIDTALK_TEST_PYTHON` (set by `scripts/test`), else where
/// `scripts/install-test-tools` puts it. Missing is a failure, not a skip: CI must run these.
pub fn python() -> PathBuf {
    let path = std::env::var_os("GRIDTALK_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            Path::new(&home).join(".cache/gridtalk/py/bin/python")
        });
    assert!(
        path.exists(),
        "{} does not exist: run scripts/install-test-tools (scripts/test does)",
        path.display()
    );
    path
}

/// A file of the repository, by its path from the repository's root.
pub fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// Runs `tests/third_party/<script>` with `args` and returns its standard output; a failure
/// fails the test with the script's error output.
pub fn run(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(python())
        .arg(repo_file(&format!("tests/third_party/{script}")))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}
