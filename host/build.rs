//! Two facts about the build, decided once here rather than by hand.
//!
//! - `WIT_FILES`: every `.wit` file of the plugin contract, embedded for
//!   `prismhook plugin new` (see `scaffold`), listed from the directory so
//!   that a new interface file cannot be left out of the skeletons.
//! - `cfg(chromium)`: whether a headless browser is installed, so that the
//!   status page's browser test is *ignored* (and reported so) where there
//!   is none, instead of passing without having run. `scripts/test.sh`
//!   installs chromium and sets `PRISMHOOK_REQUIRE_CHROMIUM`, which turns a
//!   missing browser into a build error.

use std::path::Path;

const CHROMIUM: &str = "/usr/bin/chromium";

fn main() {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    let mut files: Vec<_> = std::fs::read_dir(&wit)
        .unwrap_or_else(|e| panic!("reading {}: {e}", wit.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wit"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .wit files in {}", wit.display());
    let mut out = String::from("/// The WIT contract, as compiled into this binary.\n");
    out.push_str("pub const WIT: &[(&str, &str)] = &[\n");
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        let path = path.canonicalize().expect("a .wit file's path");
        out.push_str(&format!("    ({name:?}, include_str!({:?})),\n", path));
        println!("cargo:rerun-if-changed={}", path.display());
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("wit_files.rs");
    std::fs::write(&dest, out).expect("writing wit_files.rs");

    println!("cargo:rustc-check-cfg=cfg(chromium)");
    println!("cargo:rerun-if-env-changed=PRISMHOOK_REQUIRE_CHROMIUM");
    if Path::new(CHROMIUM).exists() {
        println!("cargo:rustc-cfg=chromium");
    } else if std::env::var_os("PRISMHOOK_REQUIRE_CHROMIUM").is_some() {
        panic!("PRISMHOOK_REQUIRE_CHROMIUM is set but {CHROMIUM} is missing (scripts/test.sh installs it)");
    }
}
