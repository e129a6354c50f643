//! The operator's settings for this plugin, checked once in `init`.
//!
//! A typo in a key would otherwise silently fall back to a default and tag
//! the wrong things, so unknown keys are rejected, and every tag the settings
//! can produce is checked to start with `<tag_prefix>.`: that prefix is what
//! keeps the plugin's hands off tags it does not own.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::tags::{self, Template};

/// PAN-OS limit on a registration timeout, in seconds (30 days).
pub const MAX_REGISTRATION_TIMEOUT: u64 = 2_592_000;
/// PAN-OS accepts POST bodies up to 5 MB.
pub const API_BODY_LIMIT: usize = 5_000_000;
/// Below this a single entry might not fit a message.
pub const MIN_MESSAGE_BYTES: usize = 4_096;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4_500_000;
pub const DEFAULT_PREFIX: &str = "ntnx";
pub const DEFAULT_STATIC_TAG: &str = "{prefix}.managed";
pub const DEFAULT_CATEGORY_TAG: &str = "{prefix}.{key}.{value}";
pub const DEFAULT_SUBSCRIPTIONS: [&str; 8] = [
    "VM.CREATE",
    "VM.ON",
    "VM.OFF",
    "VM.UPDATE",
    "VM.MIGRATE",
    "VM.NIC_PLUG",
    "VM.NIC_UNPLUG",
    "VM.DELETE",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid paloalto configuration: {0}")]
pub struct ConfigError(String);

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// The configuration as the operator wrote it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    firewall: String,
    tag_preset: Option<String>,
    prism_central: Option<String>,
    vsys: Option<String>,
    target: Option<String>,
    tag_prefix: Option<String>,
    static_tag: Option<String>,
    category_tag: Option<String>,
    categories: Option<Vec<String>>,
    registration_timeout: Option<u64>,
    max_message_bytes: Option<usize>,
    subscriptions: Option<Vec<String>>,
    compare: Option<bool>,
}

/// The checked configuration, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Base URL without a trailing `/`.
    pub firewall: String,
    pub vsys: Option<String>,
    pub target: Option<String>,
    pub tag_prefix: String,
    /// `None` when disabled with an empty string.
    pub static_tag: Option<String>,
    pub category_tag: Template,
    /// Category keys that produce tags; `None` means all of them.
    pub categories: Option<BTreeSet<String>>,
    pub registration_timeout: u64,
    pub max_message_bytes: usize,
    /// Given to the host by `init`, which leaves this empty.
    pub subscriptions: Vec<String>,
    /// Compare mode: reconcile reads the firewall and reports how it
    /// differs from what the plugin would register; nothing is ever sent
    /// or recorded (for running beside another integration before taking
    /// over from it).
    pub compare: bool,
    /// Whether its tags are named in the Panorama plugin's namespace on
    /// purpose (see [`Config::owns_tag`]).
    pub claims_panorama: bool,
    /// What every tag it registers starts with: `<tag_prefix>.`, or with
    /// the preset `<tag_prefix>.CL-`.
    pub owned: String,
}

impl Config {
    /// Parses the JSON object given to `init`.
    pub fn parse(json: &str) -> Result<Config, ConfigError> {
        let raw: Raw = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        Config::from_raw(raw)
    }

    fn from_raw(mut raw: Raw) -> Result<Config, ConfigError> {
        let firewall = check_firewall(&raw.firewall)?;
        apply_preset(&mut raw)?;

        let tag_prefix = raw.tag_prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if tag_prefix.is_empty() || tag_prefix.len() > 63 {
            return Err(invalid("`tag_prefix` must be 1 to 63 characters long"));
        }
        if !tag_prefix.chars().all(tags::is_tag_char) || tag_prefix.ends_with('.') {
            return Err(invalid(format!(
                "`tag_prefix` {tag_prefix:?} may only contain letters, digits, `.`, `_` and `-`, and must not end with `.`"
            )));
        }
        // The preset's tags all go on with `.CL-<cluster>`: owning only
        // those keeps a Prism Central named `pc1` off the tags of one named
        // `pc1.lab`, which also start with `ntnx.PC-pc1.`.
        let owned = if raw.tag_preset.is_some() {
            format!("{tag_prefix}.CL-")
        } else {
            format!("{tag_prefix}.")
        };

        let static_template = raw.static_tag.as_deref().unwrap_or(DEFAULT_STATIC_TAG);
        let static_tag = if static_template.is_empty() {
            None
        } else {
            let template = Template::parse(static_template)
                .map_err(|e| invalid(format!("`static_tag`: {e}")))?;
            if template.uses_vm_fields() {
                return Err(invalid(
                    "`static_tag` may only use the `{prefix}` placeholder",
                ));
            }
            let tag = template
                .render(&tag_prefix, "", None, "", "")
                .unwrap_or_default();
            if !tag.starts_with(&owned) || tag.len() > tags::MAX_TAG_LEN {
                return Err(invalid(format!(
                    "`static_tag` {tag:?} must start with {owned:?} and be at most {} characters",
                    tags::MAX_TAG_LEN
                )));
            }
            Some(tag)
        };

        let category_source = raw.category_tag.as_deref().unwrap_or(DEFAULT_CATEGORY_TAG);
        let category_tag = Template::parse(category_source)
            .map_err(|e| invalid(format!("`category_tag`: {e}")))?;
        let sample = category_tag
            .render(&tag_prefix, "c", Some("c"), "k", "v")
            .unwrap_or_default();
        if !sample.starts_with(&owned) || sample.len() <= owned.len() {
            return Err(invalid(format!(
                "`category_tag` {category_source:?} must produce tags that start with {owned:?}"
            )));
        }
        // Names written there on purpose (the preset, or a template of its
        // own like `{prefix}.PC-pc1.…`) claim the namespace.
        let claims_panorama =
            tag_prefix.starts_with(PANORAMA_NAMESPACE) || sample.starts_with(PANORAMA_NAMESPACE);
        if let Some(tag) = static_tag
            .as_ref()
            .filter(|t| t.starts_with(PANORAMA_NAMESPACE))
        {
            if !claims_panorama {
                return Err(invalid(format!(
                    "`static_tag` {tag:?} is in the Panorama plugin's namespace ({PANORAMA_NAMESPACE:?}), \
                     which this plugin leaves alone unless its category tags are named there too \
                     (`tag_preset = \"panorama\"`)"
                )));
            }
        }

        let registration_timeout = raw.registration_timeout.unwrap_or(0);
        if registration_timeout > MAX_REGISTRATION_TIMEOUT {
            return Err(invalid(format!(
                "`registration_timeout` {registration_timeout} is above the PAN-OS maximum of {MAX_REGISTRATION_TIMEOUT} seconds"
            )));
        }

        let max_message_bytes = raw.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if !(MIN_MESSAGE_BYTES..=API_BODY_LIMIT).contains(&max_message_bytes) {
            return Err(invalid(format!(
                "`max_message_bytes` must be between {MIN_MESSAGE_BYTES} and {API_BODY_LIMIT}"
            )));
        }

        let subscriptions = raw.subscriptions.unwrap_or_else(|| {
            DEFAULT_SUBSCRIPTIONS
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        });
        if subscriptions.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid("`subscriptions` must not contain empty entries"));
        }

        Ok(Config {
            firewall,
            vsys: non_empty(raw.vsys),
            target: non_empty(raw.target),
            tag_prefix,
            static_tag,
            category_tag,
            categories: raw.categories.map(|keys| keys.into_iter().collect()),
            registration_timeout,
            max_message_bytes,
            subscriptions,
            compare: raw.compare.unwrap_or(false),
            claims_panorama,
            owned,
        })
    }

    /// Where every XML API call goes.
    pub fn api_url(&self) -> String {
        format!("{}/api/", self.firewall)
    }

    /// Whether `tag` is one this plugin manages: under its prefix and a
    /// dot (with the preset, and `CL-`), and outside the namespace of the
    /// Panorama plugin for Nutanix (which the default `ntnx` covers) unless
    /// it names its tags there.
    pub fn owns_tag(&self, tag: &str) -> bool {
        tag.starts_with(self.owned.as_str())
            && (self.claims_panorama || !tag.starts_with(PANORAMA_NAMESPACE))
    }

    /// `tag` as this plugin registers it: one its templates render into the
    /// Panorama plugin's namespace (a category key `PC-…` under the default
    /// prefix) is moved beside it (`ntnx.PC_…`), so that every tag it
    /// registers is one it owns.
    pub fn own_tag(&self, tag: String) -> String {
        match tag.strip_prefix(PANORAMA_NAMESPACE) {
            Some(rest) if !self.claims_panorama => format!("ntnx.PC_{rest}"),
            _ => tag,
        }
    }
}

/// Where Palo Alto's Panorama plugin for Nutanix names its tags (and the
/// `panorama` preset, for one Prism Central): a plugin with another prefix
/// leaves them alone, so that it can run beside that plugin on one firewall
/// (as when moving from it) without unregistering its tags.
const PANORAMA_NAMESPACE: &str = "ntnx.PC-";

/// The tag names of Palo Alto's Panorama plugin for Nutanix.
pub const PANORAMA_PRESET: &str = "panorama";

/// `tag_preset = "panorama"`: the names Palo Alto's Panorama plugin for
/// Nutanix registers, `ntnx.PC-<prism central>.CL-<cluster>.<category>.<value>`,
/// so dynamic address groups written for it keep matching. The plugin owns
/// `ntnx.PC-<prism central>.CL-…`: tags of other Prism Centrals (another
/// prismhook, or the Panorama plugin itself) are never touched.
fn apply_preset(raw: &mut Raw) -> Result<(), ConfigError> {
    let Some(preset) = raw.tag_preset.as_deref() else {
        if raw.prism_central.is_some() {
            return Err(invalid(
                "`prism_central` is only read with `tag_preset = \"panorama\"`",
            ));
        }
        return Ok(());
    };
    if preset != PANORAMA_PRESET {
        return Err(invalid(format!(
            "`tag_preset` {preset:?} is unknown (known: \"{PANORAMA_PRESET}\")"
        )));
    }
    if raw.tag_prefix.is_some() || raw.static_tag.is_some() || raw.category_tag.is_some() {
        return Err(invalid(
            "`tag_preset` sets `tag_prefix`, `static_tag` and `category_tag`; leave them out",
        ));
    }
    let pc = raw
        .prism_central
        .as_deref()
        .map(str::trim)
        .filter(|pc| !pc.is_empty())
        .ok_or_else(|| {
            invalid("`tag_preset = \"panorama\"` needs `prism_central`, the Prism Central's name")
        })?;
    raw.tag_prefix = Some(format!("ntnx.PC-{}", tags::sanitize(pc)));
    raw.static_tag = Some(String::new());
    raw.category_tag = Some("{prefix}.CL-{vm_cluster}.{key}.{value}".to_owned());
    Ok(())
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// Accepts an `http(s)://host[:port][/path]` base URL. Credentials in the URL
/// are refused: the host injects the API key, and a URL ends up in logs.
fn check_firewall(url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| {
            invalid(format!(
                "`firewall` {url:?} must start with https:// or http://"
            ))
        })?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(invalid(format!("`firewall` {url:?} has no host")));
    }
    if authority.contains('@') {
        return Err(invalid(
            "`firewall` must not contain credentials: the host adds the API key",
        ));
    }
    if rest.contains(['?', '#']) || rest.chars().any(char::is_whitespace) {
        return Err(invalid(format!(
            "`firewall` {url:?} must be a plain base URL without query, fragment or spaces"
        )));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = Config::parse(r#"{"firewall": "https://fw1.example.com/"}"#).unwrap();
        assert_eq!(config.api_url(), "https://fw1.example.com/api/");
        assert_eq!(config.tag_prefix, "ntnx");
        assert_eq!(config.static_tag.as_deref(), Some("ntnx.managed"));
        assert_eq!(
            config
                .category_tag
                .render("ntnx", "cl", None, "AppTier", "Web")
                .as_deref(),
            Some("ntnx.AppTier.Web")
        );
        assert_eq!(config.registration_timeout, 0);
        assert_eq!(config.max_message_bytes, 4_500_000);
        assert_eq!(config.subscriptions, DEFAULT_SUBSCRIPTIONS);
        assert_eq!(config.categories, None);
        assert_eq!((config.vsys, config.target), (None, None));
    }

    #[test]
    fn the_panorama_preset_names_tags_as_the_panorama_plugin_and_owns_only_its_prism_centrals() {
        let config = Config::parse(
            r#"{"firewall": "https://fw", "tag_preset": "panorama", "prism_central": "PC East"}"#,
        )
        .unwrap();
        assert_eq!(config.tag_prefix, "ntnx.PC-PC_East");
        assert_eq!(config.static_tag, None);
        assert_eq!(
            config
                .category_tag
                .render(&config.tag_prefix, "lab", Some("ahv-01"), "AppTier", "Web")
                .as_deref(),
            Some("ntnx.PC-PC_East.CL-ahv-01.AppTier.Web")
        );
        assert!(config.owns_tag("ntnx.PC-PC_East.CL-ahv-01.AppTier.Web"));
        assert!(!config.owns_tag("ntnx.PC-PC_West.CL-ahv-01.AppTier.Web"));
        // A Prism Central whose name goes on from this one's with a dot.
        assert!(!config.owns_tag("ntnx.PC-PC_East.lab.CL-ahv-01.AppTier.Web"));
        assert!(!config.owns_tag("ntnx.managed"));
        for (bad, why) in [
            (
                r#"{"firewall": "https://fw", "tag_preset": "panorama"}"#,
                "needs `prism_central`",
            ),
            (
                r#"{"firewall": "https://fw", "tag_preset": "panorama", "prism_central": "pc", "tag_prefix": "x"}"#,
                "leave them out",
            ),
            (
                r#"{"firewall": "https://fw", "tag_preset": "fortinet"}"#,
                "is unknown",
            ),
            (
                r#"{"firewall": "https://fw", "prism_central": "pc"}"#,
                "only read with",
            ),
        ] {
            let e = Config::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn every_setting_is_read() {
        let config = Config::parse(
            r#"{"firewall": "https://pano.example.com", "vsys": "vsys2", "target": "0123456789",
                "tag_prefix": "pc", "static_tag": "", "category_tag": "{prefix}.PC-pc1.CL-{cluster}.{key}.{value}",
                "categories": ["AppTier"], "registration_timeout": 3600, "max_message_bytes": 100000,
                "subscriptions": ["VM.*"]}"#,
        )
        .unwrap();
        assert_eq!(config.vsys.as_deref(), Some("vsys2"));
        assert_eq!(config.target.as_deref(), Some("0123456789"));
        assert_eq!(config.static_tag, None);
        assert_eq!(
            config
                .category_tag
                .render("pc", "ncn-dev-sandbox", None, "AppTier", "Web")
                .as_deref(),
            Some("pc.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web")
        );
        assert_eq!(
            config.categories,
            Some(BTreeSet::from(["AppTier".to_owned()]))
        );
        assert_eq!(config.registration_timeout, 3600);
        assert_eq!(config.max_message_bytes, 100_000);
        assert_eq!(config.subscriptions, ["VM.*"]);
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let err = Config::parse(r#"{"firewall": "https://fw", "tag_prefx": "x"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `tag_prefx`"),
            "{err}"
        );
    }

    #[test]
    fn config_requires_the_firewall() {
        let err = Config::parse("{}").unwrap_err();
        assert!(
            err.to_string().contains("missing field `firewall`"),
            "{err}"
        );
    }

    #[test]
    fn config_rejects_a_timeout_above_thirty_days_or_negative() {
        let err = Config::parse(r#"{"firewall": "https://fw", "registration_timeout": 2592001}"#)
            .unwrap_err();
        assert!(err.to_string().contains("registration_timeout"), "{err}");
        assert!(
            Config::parse(r#"{"firewall": "https://fw", "registration_timeout": -1}"#).is_err()
        );
        assert!(
            Config::parse(r#"{"firewall": "https://fw", "registration_timeout": 2592000}"#).is_ok()
        );
    }

    #[test]
    fn config_rejects_firewall_urls_with_credentials_or_without_scheme() {
        assert!(Config::parse(r#"{"firewall": "fw1.example.com"}"#).is_err());
        assert!(Config::parse(r#"{"firewall": "https://admin:pw@fw1"}"#).is_err());
        assert!(Config::parse(r#"{"firewall": "https://fw1/?key=abc"}"#).is_err());
    }

    #[test]
    fn config_rejects_tags_outside_the_prefix() {
        assert!(Config::parse(r#"{"firewall": "https://fw", "static_tag": "managed"}"#).is_err());
        assert!(
            Config::parse(r#"{"firewall": "https://fw", "category_tag": "{key}.{value}"}"#)
                .is_err()
        );
        assert!(
            Config::parse(r#"{"firewall": "https://fw", "category_tag": "{prefix}.{nope}"}"#)
                .is_err()
        );
        assert!(Config::parse(r#"{"firewall": "https://fw", "tag_prefix": "a b"}"#).is_err());
        let e = Config::parse(r#"{"firewall": "https://fw", "static_tag": "{prefix}.PC-x"}"#);
        assert!(e.is_err_and(|e| e.to_string().contains("Panorama plugin's namespace")));
        // With category tags named there too, the namespace is claimed.
        let claimed = r#"{"firewall": "https://fw", "static_tag": "{prefix}.PC-x",
            "category_tag": "{prefix}.PC-x.{key}.{value}"}"#;
        assert!(Config::parse(claimed).is_ok_and(|c| c.owns_tag("ntnx.PC-x")));
        assert!(
            Config::parse(r#"{"firewall": "https://fw", "static_tag": "{prefix}.{key}"}"#).is_err()
        );
    }

    #[test]
    fn config_rejects_a_message_limit_above_the_api_limit() {
        assert!(
            Config::parse(r#"{"firewall": "https://fw", "max_message_bytes": 6000000}"#).is_err()
        );
        assert!(Config::parse(r#"{"firewall": "https://fw", "max_message_bytes": 10}"#).is_err());
    }

    #[test]
    fn owned_tags_are_those_under_the_prefix_and_a_dot() {
        let config = Config::parse(r#"{"firewall": "https://fw"}"#).unwrap();
        assert!(config.owns_tag("ntnx.managed"));
        assert!(!config.owns_tag("ntnxfoo.managed"));
        assert!(!config.owns_tag("web"));
    }

    #[test]
    fn the_default_prefix_leaves_the_panorama_plugins_tags_alone_and_names_none_there() {
        let config = Config::parse(r#"{"firewall": "https://fw"}"#).unwrap();
        assert!(!config.owns_tag("ntnx.PC-East.CL-ahv-01.AppTier.Web"));
        assert!(config.owns_tag("ntnx.PCI.yes"));
        let moved = config.own_tag("ntnx.PC-owner.alice".into());
        assert_eq!(moved, "ntnx.PC_owner.alice");
        assert!(config.owns_tag(&moved));
        assert_eq!(config.own_tag("ntnx.App.web".into()), "ntnx.App.web");
        // The preset is in that namespace: its own tags are its own.
        let preset = Config::parse(
            r#"{"firewall": "https://fw", "tag_preset": "panorama", "prism_central": "East"}"#,
        )
        .unwrap();
        let tag = "ntnx.PC-East.CL-ahv-01.AppTier.Web";
        assert!(preset.owns_tag(tag));
        assert_eq!(preset.own_tag(tag.into()), tag);
        // So is a template that names its tags there on purpose.
        let own_style = Config::parse(
            r#"{"firewall": "https://fw", "category_tag": "{prefix}.PC-pc1.CL-{cluster}.{key}.{value}"}"#,
        )
        .unwrap();
        assert!(own_style.owns_tag("ntnx.PC-pc1.CL-lab.App.web"));
    }
}
