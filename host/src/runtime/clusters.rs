//! Which Nutanix cluster each VM of a call belongs to (the
//! `context.vm-cluster-name` import), kept small: a fed reconcile gathers it
//! for every VM of the inventory while the host holds only a few pages.

use std::collections::HashMap;
use std::sync::Arc;

/// VM uuid → the name of the Nutanix cluster it belongs to, for the VMs a
/// call hands over. A canonical uuid (lowercase, 8-4-4-4-12) is kept as its
/// 128 bits and a name once for all the VMs that share it: about 40 bytes
/// a VM instead of two strings.
#[derive(Debug, Clone, Default)]
pub struct VmClusters {
    by_bits: HashMap<u128, u32>,
    /// Uuids that are not canonical, as they came.
    by_text: HashMap<String, u32>,
    names: Vec<Arc<str>>,
}

impl VmClusters {
    pub fn insert(&mut self, uuid: &str, cluster: &str) {
        let name = match self.names.iter().position(|n| **n == *cluster) {
            Some(at) => at,
            None => {
                self.names.push(cluster.into());
                self.names.len() - 1
            }
        } as u32;
        match canonical_bits(uuid) {
            Some(bits) => self.by_bits.insert(bits, name),
            None => self.by_text.insert(uuid.to_owned(), name),
        };
    }

    pub fn get(&self, uuid: &str) -> Option<&str> {
        let name = match canonical_bits(uuid) {
            Some(bits) => self.by_bits.get(&bits),
            None => self.by_text.get(uuid),
        }?;
        Some(&self.names[*name as usize])
    }

    pub fn len(&self) -> usize {
        self.by_bits.len() + self.by_text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<U: AsRef<str>, C: AsRef<str>> FromIterator<(U, C)> for VmClusters {
    fn from_iter<I: IntoIterator<Item = (U, C)>>(pairs: I) -> VmClusters {
        let mut clusters = VmClusters::default();
        for (uuid, cluster) in pairs {
            clusters.insert(uuid.as_ref(), cluster.as_ref());
        }
        clusters
    }
}

/// The 128 bits of a uuid in Prism's form, lowercase 8-4-4-4-12. Only that
/// one spelling maps to bits, so two different strings never share them.
fn canonical_bits(uuid: &str) -> Option<u128> {
    let bytes = uuid.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut bits = 0u128;
    for (i, &b) in bytes.iter().enumerate() {
        let digit = match (i, b) {
            (8 | 13 | 18 | 23, b'-') => continue,
            (8 | 13 | 18 | 23, _) => return None,
            (_, b'0'..=b'9') => b - b'0',
            (_, b'a'..=b'f') => b - b'a' + 10,
            _ => return None,
        };
        bits = bits << 4 | u128::from(digit);
    }
    Some(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_spelling_of_a_uuid_is_its_own_key() {
        let lower = "0c4a5b6d-aaaa-4bbb-8ccc-0123456789ab";
        let upper = "0C4A5B6D-AAAA-4BBB-8CCC-0123456789AB";
        let clusters: VmClusters = [
            (lower, "pe-1"),
            (upper, "pe-2"),
            ("vm-7", "pe-1"),
            ("0c4a5b6daaaa4bbb8ccc0123456789ab0000", "pe-3"),
        ]
        .into_iter()
        .collect();
        assert_eq!(clusters.len(), 4);
        assert_eq!(clusters.get(lower), Some("pe-1"));
        assert_eq!(clusters.get(upper), Some("pe-2"));
        assert_eq!(clusters.get("vm-7"), Some("pe-1"));
        assert_eq!(
            clusters.get("0c4a5b6daaaa4bbb8ccc0123456789ab0000"),
            Some("pe-3")
        );
        assert_eq!(clusters.get("0c4a5b6d-aaaa-4bbb-8ccc-0123456789ac"), None);
        assert_eq!(clusters.get("vm-8"), None);
        assert_eq!(clusters.names.len(), 3, "names are kept once");
        assert_eq!(
            canonical_bits(lower),
            Some(0x0c4a5b6d_aaaa_4bbb_8ccc_0123456789ab)
        );
    }
}
