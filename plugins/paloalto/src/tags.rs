//! Which tags a VM's IPs should carry on the firewall.
//!
//! Category keys and values come from Prism and may hold any character, but
//! they end up as PAN-OS tag names, which dynamic address group filters match
//! literally: they are reduced to `[A-Za-z0-9._-]`, and tags longer than the
//! firewall accepts are cut deterministically, with a hash of the full name
//! so two long values never collapse into one tag.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::config::Config;
use crate::host::Vm;

/// Longest tag name PAN-OS is commonly reported to accept.
pub const MAX_TAG_LEN: usize = 127;

/// Tags per IP: the unit everything else compares.
pub type IpTags = BTreeMap<String, BTreeSet<String>>;

pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Replaces every character a tag name cannot hold with `_`.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_sanitized(&mut out, text);
    out
}

fn push_sanitized(out: &mut String, text: &str) {
    out.extend(text.chars().map(|c| if is_tag_char(c) { c } else { '_' }));
}

/// `tag`, with `-` and 8 hex digits of a hash of `key` and `value` when
/// either held characters beyond ASCII: [`sanitize`] makes each of them
/// `_`, so `Env: 本番` and `Env: 開発` (production and development) would
/// otherwise be one tag, and one dynamic address group.
fn distinct(tag: String, key: &str, value: &str) -> String {
    if key.is_ascii() && value.is_ascii() {
        return tag;
    }
    let raw = format!("{key}\0{value}");
    format!("{tag}-{:08x}", fnv1a(raw.as_bytes()) as u32)
}

/// Cuts a tag to [`MAX_TAG_LEN`], ending it with `-` and 8 hex digits of a
/// hash of the whole name. Tags are ASCII after [`sanitize`], so cutting at a
/// byte offset is safe; the `get` keeps it panic-free even if one is not.
pub fn limit_length(tag: String) -> String {
    if tag.len() <= MAX_TAG_LEN {
        return tag;
    }
    let suffix = format!("-{:08x}", fnv1a(tag.as_bytes()) as u32);
    let mut keep = MAX_TAG_LEN - suffix.len();
    while !tag.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", tag.get(..keep).unwrap_or_default())
}

/// FNV-1a: tiny, stable across builds and platforms (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Prefix,
    /// The event's cluster: prismhook's name for the Prism endpoint.
    Cluster,
    /// The Nutanix cluster the VM belongs to, by Prism's name for it.
    VmCluster,
    Key,
    Value,
}

/// A tag name template such as `{prefix}.CL-{cluster}.{key}.{value}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

impl Template {
    pub fn parse(source: &str) -> Result<Template, String> {
        // Byte searches: `{` and `}` are ASCII, and this runs in every
        // call's `init`, where a `char` pattern's search is dear.
        let find = |text: &str, byte: u8| text.bytes().position(|b| b == byte);
        let mut pieces = Vec::with_capacity(4);
        let mut rest = source;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let end =
                    find(after, b'}').ok_or_else(|| format!("unclosed `{{` in {source:?}"))?;
                pieces.push(match &after[..end] {
                    "prefix" => Piece::Prefix,
                    "cluster" => Piece::Cluster,
                    "vm_cluster" => Piece::VmCluster,
                    "key" => Piece::Key,
                    "value" => Piece::Value,
                    other => {
                        return Err(format!(
                            "unknown placeholder `{{{other}}}` (known: {{prefix}}, {{cluster}}, {{vm_cluster}}, {{key}}, {{value}})"
                        ))
                    }
                });
                rest = &after[end + 1..];
            } else {
                let end = find(rest, b'{').unwrap_or(rest.len());
                let literal = &rest[..end];
                if let Some(bad) = literal.chars().find(|&c| !is_tag_char(c)) {
                    return Err(format!(
                        "{bad:?} cannot appear in a tag name (letters, digits, `.`, `_`, `-` only)"
                    ));
                }
                pieces.push(Piece::Literal(literal.to_owned()));
                rest = &rest[end..];
            }
        }
        Ok(Template(pieces))
    }

    /// Whether the template needs a VM's cluster or category.
    pub fn uses_vm_fields(&self) -> bool {
        self.0.iter().any(|p| {
            matches!(
                p,
                Piece::Cluster | Piece::VmCluster | Piece::Key | Piece::Value
            )
        })
    }

    /// Whether the template needs the Nutanix cluster of the VM.
    pub fn uses_vm_cluster(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Piece::VmCluster))
    }

    /// Fills in the placeholders with sanitised values; no length limit.
    /// `None` when it needs the VM's Nutanix cluster and that is unknown: a
    /// tag named without it would be another tag.
    pub fn render(
        &self,
        prefix: &str,
        cluster: &str,
        vm_cluster: Option<&str>,
        key: &str,
        value: &str,
    ) -> Option<String> {
        // One string written in place: this runs for every category of
        // every VM of a batch.
        let mut tag = String::with_capacity(64);
        for piece in &self.0 {
            match piece {
                Piece::Literal(text) => tag.push_str(text),
                Piece::Prefix => push_sanitized(&mut tag, prefix),
                Piece::Cluster => push_sanitized(&mut tag, cluster),
                Piece::VmCluster => push_sanitized(&mut tag, vm_cluster?),
                Piece::Key => push_sanitized(&mut tag, key),
                Piece::Value => push_sanitized(&mut tag, value),
            }
        }
        Some(tag)
    }
}

/// The tags every IP of a powered-on VM should carry.
pub fn vm_tags(config: &Config, cluster: &str, vm: &Vm) -> BTreeSet<String> {
    let mut tags: BTreeSet<String> = config.static_tag.iter().cloned().collect();
    for (key, value) in &vm.categories {
        if config
            .categories
            .as_ref()
            .is_some_and(|keys| !keys.contains(key))
        {
            continue;
        }
        let rendered = config.category_tag.render(
            &config.tag_prefix,
            cluster,
            vm.cluster_name.as_deref(),
            key,
            value,
        );
        // Without its Nutanix cluster the VM's category tags cannot be
        // named; the static tag still marks it managed.
        let Some(tag) = rendered else { break };
        tags.insert(limit_length(distinct(config.own_tag(tag), key, value)));
    }
    tags
}

/// What a powered-on VM contributes: every valid IP of every NIC with
/// [`vm_tags`]. Nothing when the VM yields no tags at all.
pub fn wanted(config: &Config, cluster: &str, vm: &Vm) -> IpTags {
    let tags = vm_tags(config, cluster, vm);
    if tags.is_empty() {
        return IpTags::new();
    }
    vm.nics
        .iter()
        .flatten()
        .filter_map(|ip| parse_ip(ip))
        .filter(|ip| reachable(*ip))
        .map(|ip| (ip.to_string(), tags.clone()))
        .collect()
}

/// Whether other machines (and so the firewall's rules) see the VM at
/// `ip`: Prism lists every address a NIC reports, an IPv6 NIC's link-local
/// one among them, which would only spend registrations.
fn reachable(ip: IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    !(link_local || ip.is_loopback() || ip.is_unspecified() || ip.is_multicast())
}

/// The VM's IPs that are not IP addresses; they are skipped (and logged).
pub fn invalid_ips(vm: &Vm) -> Vec<&str> {
    vm.nics
        .iter()
        .flatten()
        .filter(|ip| normalise_ip(ip).is_none())
        .map(String::as_str)
        .collect()
}

/// The canonical text of an IP, so `ip/<ip>` records and the firewall's
/// answers compare equal whatever spelling Prism used.
pub fn normalise_ip(ip: &str) -> Option<String> {
    parse_ip(ip).map(|ip| ip.to_string())
}

fn parse_ip(ip: &str) -> Option<IpAddr> {
    ip.trim().parse().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    /// `vm_update_nic_ip.json`: web-01 with two NICs, powered on.
    pub(crate) fn web_01() -> Vm {
        Vm {
            uuid: "bdbbad7a-a401-4f9a-a789-2b8406905b56".into(),
            name: Some("web-01".into()),
            power_state: Some("ON".into()),
            categories: vec![
                ("AppTier".into(), "Web".into()),
                ("Environment".into(), "Production".into()),
            ],
            nics: vec![vec!["10.23.129.96".into()], vec!["10.40.142.61".into()]],
            cluster_name: Some("ncn-dev-sandbox".into()),
        }
    }

    fn set(tags: &[&str]) -> BTreeSet<String> {
        tags.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn every_ip_of_a_vm_gets_the_static_tag_and_one_tag_per_category() {
        let config = config(r#"{"firewall": "https://fw"}"#);
        let wanted = wanted(&config, "ncn-dev-sandbox", &web_01());
        let tags = set(&[
            "ntnx.managed",
            "ntnx.AppTier.Web",
            "ntnx.Environment.Production",
        ]);
        assert_eq!(
            wanted,
            IpTags::from([
                ("10.23.129.96".into(), tags.clone()),
                ("10.40.142.61".into(), tags)
            ])
        );
    }

    #[test]
    fn the_panorama_style_template_names_pc_cluster_key_and_value() {
        let config = config(
            r#"{"firewall": "https://fw", "static_tag": "",
                "category_tag": "{prefix}.PC-pc1.CL-{cluster}.{key}.{value}", "categories": ["AppTier"]}"#,
        );
        assert_eq!(
            vm_tags(&config, "ncn-dev-sandbox", &web_01()),
            set(&["ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web"])
        );
    }

    #[test]
    fn the_panorama_preset_names_the_vms_own_nutanix_cluster_and_skips_tags_it_cannot_name() {
        let config = config(
            r#"{"firewall": "https://fw", "tag_preset": "panorama", "prism_central": "pc1",
                "categories": ["AppTier"]}"#,
        );
        assert_eq!(
            vm_tags(&config, "lab", &web_01()),
            set(&["ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web"])
        );
        let unknown = Vm {
            cluster_name: None,
            ..web_01()
        };
        assert!(wanted(&config, "lab", &unknown).is_empty());
    }

    #[test]
    fn a_vm_without_tags_contributes_nothing() {
        let config = config(r#"{"firewall": "https://fw", "static_tag": ""}"#);
        let vm = Vm {
            categories: vec![],
            ..web_01()
        };
        assert!(wanted(&config, "c", &vm).is_empty());
    }

    #[test]
    fn category_values_are_sanitised_into_tag_characters() {
        let config = config(r#"{"firewall": "https://fw", "static_tag": ""}"#);
        let vm = Vm {
            categories: vec![("Team name".into(), "x'\"]<&".into())],
            ..web_01()
        };
        assert_eq!(vm_tags(&config, "c", &vm), set(&["ntnx.Team_name.x_____"]));
    }

    #[test]
    fn values_beyond_ascii_keep_distinct_tags() {
        let config = config(r#"{"firewall": "https://fw", "static_tag": ""}"#);
        let tag = |value: &str| {
            let vm = Vm {
                categories: vec![("Env".into(), value.into())],
                ..web_01()
            };
            vm_tags(&config, "c", &vm).pop_first().unwrap()
        };
        // Production and development: sanitised alike, told apart by a hash.
        let (production, development) = (tag("本番"), tag("開発"));
        assert_ne!(production, development);
        for t in [&production, &development] {
            assert!(
                t.starts_with("ntnx.Env.__-") && t.len() == "ntnx.Env.__-".len() + 8,
                "{t}"
            );
        }
        assert_eq!(production, tag("本番"), "the same value, the same tag");
    }

    #[test]
    fn long_tags_are_cut_to_127_characters_and_stay_distinct() {
        let config = config(r#"{"firewall": "https://fw", "static_tag": ""}"#);
        let long = "v".repeat(200);
        let a = Vm {
            categories: vec![("K".into(), format!("{long}a"))],
            ..web_01()
        };
        let b = Vm {
            categories: vec![("K".into(), format!("{long}b"))],
            ..web_01()
        };
        let (ta, tb) = (vm_tags(&config, "c", &a), vm_tags(&config, "c", &b));
        let (ta, tb) = (ta.first().unwrap(), tb.first().unwrap());
        assert_eq!((ta.len(), tb.len()), (127, 127));
        assert_ne!(ta, tb);
        assert!(ta.starts_with("ntnx.K.vvv"));
        assert_eq!(
            ta,
            &limit_length(format!("ntnx.K.{long}a")),
            "the cut is deterministic"
        );
    }

    #[test]
    fn ips_are_normalised_and_invalid_ones_skipped() {
        let config = config(r#"{"firewall": "https://fw"}"#);
        let vm = Vm {
            nics: vec![vec![
                " 10.0.0.1 ".into(),
                "not-an-ip".into(),
                "2001:DB8::1".into(),
            ]],
            ..web_01()
        };
        let ips: Vec<_> = wanted(&config, "c", &vm).into_keys().collect();
        assert_eq!(ips, ["10.0.0.1", "2001:db8::1"]);
        assert_eq!(invalid_ips(&vm), ["not-an-ip"]);
    }

    #[test]
    fn addresses_no_other_machine_reaches_the_vm_at_are_not_registered() {
        let config = config(r#"{"firewall": "https://fw"}"#);
        let vm = Vm {
            nics: vec![vec![
                "FE80::5054:ff:fe12:3456".into(),
                "169.254.0.7".into(),
                "127.0.0.1".into(),
                "::".into(),
                "ff02::1".into(),
                "10.0.0.1".into(),
            ]],
            ..web_01()
        };
        let ips: Vec<_> = wanted(&config, "c", &vm).into_keys().collect();
        assert_eq!(ips, ["10.0.0.1"]);
        assert!(invalid_ips(&vm).is_empty(), "skipped, not invalid");
    }
}
