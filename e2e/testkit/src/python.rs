//! The e2e Python environment (the venv `e2e/setup-host.sh` installs) for tests that drive podvisor
//! with Python clients.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The e2e venv's Python (`PODVISOR_E2E_PYTHON`, else ~/.cache/podvisor/venv) if it can import
/// `module`. Otherwise prints a SKIPPED line and returns None — or panics when
/// PODVISOR_REQUIRE_PYTHON=1 (the test suite installs the venv).
pub fn python(test: &str, module: &str) -> Option<PathBuf> {
    let python = std::env::var_os("PODVISOR_E2E_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/podvisor/venv/bin/python"))
        })?;
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let why = format!(
        "{} cannot import {module} (run e2e/setup-host.sh)",
        python.display()
    );
    if std::env::var("PODVISOR_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("{test}: PODVISOR_REQUIRE_PYTHON=1 but {why}");
    }
    println!("SKIPPED {test}: {why}");
    None
}
