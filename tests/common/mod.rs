//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// A guest component built by `cargo xtask plugins`.
pub fn component(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the guest components first with `cargo xtask plugins`",
        path.display()
    );
    path
}

/// A fixture from ../shared/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures").join(rel);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

pub fn fixture_json(rel: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(rel)).unwrap()).unwrap()
}

/// Logs of the host under test, shown when a test fails.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,prismhook=info".into()),
        )
        .with_test_writer()
        .try_init();
}
