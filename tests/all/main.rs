//! The host's end-to-end tests, in one binary (wasmtime's `tests/all`
//! pattern): wasmtime and the host are linked once instead of once per
//! file. Each module tests one concern against real parts: compiled guest
//! components (`cargo xtask plugins` builds them), the simulators on
//! loopback ports, real files and the real binary.
//!
//! A file under `tests/all` that is not declared here would never run;
//! `every_test_file_is_part_of_the_suite` fails when one is missing.

mod common;

mod admin;
mod cluster;
mod durability;
mod fmc;
mod hardening;
mod instances;
mod languages;
mod nutanix;
mod paloalto;
mod plugin_new;
mod reload;
mod runtime;
mod secrets;
mod sessions;

/// Every `.rs` file (and directory module) beside this one is declared
/// above, and no test file is left at the top of `tests/`, where no target
/// would build it.
#[test]
fn every_test_file_is_part_of_the_suite() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/all");
    let main = std::fs::read_to_string(here.join("main.rs")).unwrap();
    let declared: std::collections::BTreeSet<String> = main
        .lines()
        .filter_map(|l| l.strip_prefix("mod ")?.strip_suffix(';'))
        .map(str::to_owned)
        .collect();
    for entry in std::fs::read_dir(&here).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let is_module =
            path.extension().is_some_and(|e| e == "rs") || path.join("mod.rs").is_file();
        if is_module && name != "main" {
            assert!(
                declared.contains(&name),
                "tests/all/{name} is not declared in tests/all/main.rs, so it never runs"
            );
        }
    }
    let top = here.parent().unwrap();
    for entry in std::fs::read_dir(top).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            path.extension().is_none_or(|e| e != "rs"),
            "{} is outside tests/all and is built by no test target",
            path.display()
        );
    }
}
