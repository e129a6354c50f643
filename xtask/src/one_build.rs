//! `cargo xtask one-build`: checks that the demo's build of the host is one
//! the tests reuse.
//!
//! Cargo turns on a dependency's features according to the packages a
//! command builds: `cargo build -p prismhook` (scripts/demo.sh) sees only the
//! host's wishes, `cargo test --workspace` (scripts/test.sh) also xtask's and
//! the dev-dependencies'. One feature apart on one crate, and that crate and
//! everything above it build twice: semver's `std` once cost a first
//! `test.sh` wasmparser, wasmtime and their dependants again. This compares
//! the two resolutions (`cargo tree -e features`) and names every crate the
//! host's build resolves differently.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn run(root: &Path) -> Result<()> {
    let host = resolved(root, &["-p", "prismhook"])?;
    let workspace = resolved(root, &["--workspace"])?;
    let apart: Vec<&String> = host.difference(&workspace).collect();
    if apart.is_empty() {
        println!(
            "one-build: the host's {} crates resolve as `cargo test --workspace` resolves them",
            host.len()
        );
        return Ok(());
    }
    let lines: Vec<String> = apart.iter().map(|l| format!("  {l}")).collect();
    bail!(
        "`cargo build -p prismhook` resolves these crates with other features than \
         `cargo test --workspace`, so the tests build them (and what depends on them) again:\n{}\n\
         ask for the workspace's features in host/Cargo.toml (see its `semver` line)",
        lines.join("\n")
    )
}

/// Every (crate, version, features) the selection builds, as `cargo tree`
/// prints them with `{p} {f}`.
fn resolved(root: &Path, selection: &[&str]) -> Result<BTreeSet<String>> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root)
        .args(["tree", "--locked", "-e", "features", "--prefix", "none"])
        .args(["-f", "{p} {f}"])
        .args(selection)
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree {} failed: {}",
            selection.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        // Feature edges ("x feature \"y\"") repeat what the package lines say.
        .filter(|l| !l.contains(" feature \""))
        .map(|l| l.trim_end_matches(" (*)").to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}
