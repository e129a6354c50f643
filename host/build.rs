//! `WIT_FILES`: every `.wit` file of the plugin contract, embedded for
//! `prismhook plugin new` (see `scaffold`), listed from the directory so
//! that a new interface file cannot be left out of the skeletons.
//!
//! Nothing here reads the environment or the machine: a build of the host
//! made for the demo serves the tests too.

use std::path::Path;

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
}
