//! Any configuration file, environment and plugin settings file: loading
//! never panics, and a settings file from the plugins directory gets no
//! secret that the main configuration does not grant it for that origin,
//! nor undoes the operator's pin, trust or limits.
//! (Nothing here resolves a secret: no environment variable or file is read.)
//!
//! Input: the configuration, the settings file, the plugin's name and
//! `NAME=value` lines of environment, separated by NUL (which TOML text
//! cannot hold), so a fixture's configuration is a seed as it is.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use prismhook_core::config::{confine_settings_file, Config, PluginConfig};
use prismhook_core::limits::Limits;
use prismhook_core::policy::OriginRule;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let config = parts.next().unwrap_or_default();
    let settings = parts.next().unwrap_or_default();
    let plugin = parts.next().unwrap_or("probe");
    let vars = parts.next().unwrap_or_default().lines().filter_map(|line| {
        let (name, value) = line.split_once('=')?;
        Some((name.to_owned(), value.to_owned()))
    });
    let config = Config::parse_with_env(config, Path::new("fuzz.toml"), vars);
    if let Err(e) = &config {
        assert!(!e.to_string().is_empty());
    }
    let Ok(settings) = toml::from_str::<PluginConfig>(settings) else {
        return;
    };
    let main = config.as_ref().ok().and_then(|c| c.plugin.get(plugin));
    let defaults = config
        .as_ref()
        .map_or_else(|_| Limits::default(), |c| c.default_limits());
    let Ok(confined) = confine_settings_file(settings, main, plugin, &defaults) else {
        return;
    };
    assert!(confined.grants.is_empty());
    if let Some(main) = main {
        if main.sha256.is_some() {
            assert_eq!(confined.sha256, main.sha256, "the operator's pin holds");
        }
        assert_eq!(confined.tls, main.tls, "the operator's trust holds");
        assert!(
            main.enabled || !confined.enabled,
            "the operator's switch holds"
        );
    }
    let ceiling = defaults.with(&main.map(|m| m.limits.clone()).unwrap_or_default());
    assert_eq!(
        defaults.with(&confined.limits).first_above(&ceiling),
        None,
        "the file raised a limit"
    );
    for inject in &confined.inject {
        let source = (&inject.env, &inject.file, &inject.value);
        if source == (&None, &None, &None) {
            continue;
        }
        // A secret the settings file may use: one of this plugin's grants,
        // granted for exactly this origin.
        let wanted = OriginRule::parse(&inject.origin).expect("confined origins parse");
        let granted = main.is_some_and(|m| {
            m.grants.values().any(|g| {
                (&g.env, &g.file, &g.value) == source
                    && g.origins
                        .iter()
                        .any(|o| OriginRule::parse(o).is_ok_and(|r| r == wanted))
            })
        });
        assert!(
            granted,
            "ungranted secret for {}: {source:?}",
            inject.origin
        );
    }
});
