//! The Prism v3 API's answers, read leniently: list pages, webhook intents
//! and error bodies. The host's Prism client sends the requests; everything
//! it does with an answer's JSON is here, so a hostile or broken Prism can
//! be fuzzed without a network (`core/fuzz`, target `prism_answers`).

use serde_json::Value;

use super::payload::INTENT;
use super::pruned::Keep;
use super::str_at;
use crate::text::truncate;

/// No listing reads past this many entities. Prism Central manages tens of
/// thousands of VMs at most; an answer that keeps paging beyond this is
/// broken or hostile, and would otherwise grow the host without end.
pub const MAX_LISTED: usize = 1_000_000;

/// Longest reason taken from an error answer, in bytes; a longer one is cut
/// at a character boundary and ends in `…`.
pub const MAX_REASON: usize = 1024;

/// A webhook as Prism reports it. Prism never returns the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub uuid: String,
    pub name: String,
    pub post_url: String,
    pub events: Vec<String>,
    pub spec_version: u64,
    /// `PENDING`, `COMPLETE`, `ERROR`, ... (older `kComplete` normalised).
    pub state: String,
    pub username: Option<String>,
}

/// Spec first (what was asked), status as the fallback: a `PENDING` intent
/// may have no status resources yet. `None` without a `metadata.uuid`.
pub fn parse_webhook(intent: &Value) -> Option<Webhook> {
    let uuid = str_at(intent, "/metadata/uuid")?.to_owned();
    let either = |path: &str| {
        str_at(intent, &format!("/spec{path}"))
            .or_else(|| str_at(intent, &format!("/status{path}")))
    };
    let events = [
        "/spec/resources/events_filter_list",
        "/status/resources/events_filter_list",
    ]
    .iter()
    .find_map(|p| intent.pointer(p).and_then(Value::as_array))
    .map(|list| {
        list.iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default();
    let spec_version = match intent.pointer("/metadata/spec_version") {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    };
    Some(Webhook {
        uuid,
        name: either("/name").unwrap_or_default().to_owned(),
        post_url: either("/resources/post_url").unwrap_or_default().to_owned(),
        events,
        spec_version,
        state: normalise_state(str_at(intent, "/status/state").unwrap_or("UNKNOWN")),
        username: either("/resources/credentials/username").map(str::to_owned),
    })
}

/// `kComplete` (older AOS) and `COMPLETE` are the same state.
pub fn normalise_state(state: &str) -> String {
    let bare = match state.strip_prefix('k') {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_uppercase()) => rest,
        _ => state,
    };
    bare.to_ascii_uppercase()
}

/// The reason of an error answer, at most [`MAX_REASON`] bytes (plus the
/// status): Prism's messages when the body is its JSON error, a fixed text
/// for the HTML 401, the status line otherwise. Each of `secrets` is
/// redacted from the messages before they are cut (see [`redact`]).
pub fn error_reason(status: http::StatusCode, body: &[u8], secrets: &[&str]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        v.get("message_list")
            .and_then(messages)
            .or_else(|| str_at(v, "/message").map(str::to_owned))
    });
    match from_json {
        Some(text) => format!(
            "{} ({})",
            truncate(redact(text, secrets), MAX_REASON),
            status.as_u16()
        ),
        None if status == http::StatusCode::UNAUTHORIZED => {
            "authentication failed (401)".to_owned()
        }
        None => format!("answered {status}"),
    }
}

/// Why an intent in an error state failed: its status messages on one line,
/// at most [`MAX_REASON`] bytes, `secrets` redacted as in [`error_reason`].
pub fn status_messages(intent: &Value, secrets: &[&str]) -> Option<String> {
    intent
        .pointer("/status/message_list")
        .and_then(messages)
        .map(|text| truncate(redact(text, secrets), MAX_REASON))
}

/// `text` with every non-empty one of `secrets` (a password Prism or a
/// library may echo) replaced by `<redacted>`. Before any cut to a bound:
/// cutting first could leave a secret's prefix that no longer matches.
pub fn redact(mut text: String, secrets: &[&str]) -> String {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if text.contains(secret) {
            text = text.replace(secret, "<redacted>");
        }
    }
    text
}

/// `message_list: [{message, reason}]` as one line.
fn messages(list: &Value) -> Option<String> {
    let parts: Vec<String> = list
        .as_array()?
        .iter()
        .filter_map(|m| match (str_at(m, "/message"), str_at(m, "/reason")) {
            (Some(message), Some(reason)) if !message.contains(reason) => {
                Some(format!("{reason}: {message}"))
            }
            (Some(message), _) => Some(message.to_owned()),
            (None, Some(reason)) => Some(reason.to_owned()),
            (None, None) => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// What was wrong with a list answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("`entities` is not a list")]
    NotAList,
    #[error("it lists more than {MAX_LISTED} entities; refusing to read further")]
    TooMany,
    #[error(
        "the page at offset {offset} holds none of the last page's final entities: more than \
         {overlap} were deleted while the listing ran, or the order changed; it is read again later"
    )]
    Shifted { offset: u64, overlap: u64 },
    #[error(
        "the page at offset {offset} holds only entities already listed: the server seems to \
         ignore `offset`"
    )]
    Repeated { offset: u64 },
}

/// What the VM listing's reader uses of a `POST /vms/list` answer (read
/// with [`super::pruned::read`]): each VM as [`super::payload::parse_vm`]
/// reads it, and the total; a page of 500 VMs is megabytes of JSON.
pub const VM_LIST: Keep = Keep::Members(&[
    ("entities", Keep::Each(&INTENT)),
    ("metadata", Keep::Members(&[("total_matches", Keep::All)])),
]);

/// One `POST /{collection}/list` after another from offset 0, until
/// `metadata.total_matches` is reached, or, without it, a short page; an
/// empty page always ends it. Feed each answer to [`Listing::add`], which
/// hands its entities back (so a caller can convert a page and drop it,
/// rather than hold every answer of a large inventory), and ask for the next
/// page at [`Listing::offset`].
///
/// Prism pages by offset, so an entity deleted from an earlier page while
/// the listing runs shifts the rest one place down, and the next page would
/// start one entity late: a VM that existed all along would be missed, and
/// a reconcile would take its registrations away. So each page after the
/// first starts [`Listing::overlap`] entities before where the last one
/// ended, entities are handed out once by `metadata.uuid`, and a page must
/// hold one of the last page's final entities: otherwise more were deleted
/// than the overlap absorbs ([`ListError::Shifted`]). A full page of
/// entities all handed out before means the server ignores `offset`
/// ([`ListError::Repeated`]).
#[derive(Debug)]
pub struct Listing {
    page: u64,
    /// Where the next request starts.
    offset: u64,
    /// Entities handed out, with a uuid or not.
    handed: u64,
    /// The uuids handed out (see [`Identity`]).
    seen: std::collections::HashSet<Identity>,
    /// The uuids of the last page's final [`Listing::overlap`] entities.
    tail: Vec<Identity>,
}

/// An entity's `metadata.uuid`: the 128 bits of a canonical UUID, or a
/// 64-bit hash of any other text (so that 200,000 VMs take megabytes, not
/// tens of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Identity {
    Uuid(u128),
    Hashed(u64),
}

impl Identity {
    fn of(entity: &Value) -> Option<Identity> {
        let uuid = str_at(entity, "/metadata/uuid")?;
        let hex: String = uuid.chars().filter(|&c| c != '-').collect();
        match u128::from_str_radix(&hex, 16) {
            Ok(bits) if hex.len() == 32 && uuid.len() == 36 => Some(Identity::Uuid(bits)),
            _ => {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                uuid.hash(&mut hasher);
                Some(Identity::Hashed(hasher.finish()))
            }
        }
    }
}

/// One answer's share of a [`Listing`].
#[derive(Debug, PartialEq)]
pub struct Page {
    /// Those not handed out before.
    pub entities: Vec<Value>,
    /// Whether the listing is complete.
    pub last: bool,
}

impl Listing {
    /// A listing that asks for `page` entities at a time.
    pub fn new(page: u64) -> Listing {
        Listing {
            page,
            offset: 0,
            handed: 0,
            seen: Default::default(),
            tail: Vec::new(),
        }
    }

    /// The `offset` of the next request.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The `length` of every request.
    pub fn page(&self) -> u64 {
        self.page
    }

    /// How many entities a page reads again of the one before: a tenth of a
    /// page and one (51 of Prism's 500), which absorbs one deletion fewer
    /// between two requests.
    pub fn overlap(&self) -> u64 {
        (self.page / 10 + 1).min(self.page.saturating_sub(1)).max(1)
    }

    /// Takes one answer: its entities not handed out before, and whether
    /// the listing is complete.
    pub fn add(&mut self, mut answer: Value) -> Result<Page, ListError> {
        // Prism leaves `entities` out when there are none.
        let entities = match answer.get_mut("entities").map(Value::take) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(ListError::NotAList),
        };
        let got = entities.len() as u64;
        let ids: Vec<Option<Identity>> = entities.iter().map(Identity::of).collect();
        if got > 0
            && !self.tail.is_empty()
            && !ids.iter().flatten().any(|id| self.tail.contains(id))
        {
            return Err(ListError::Shifted {
                offset: self.offset,
                overlap: self.overlap(),
            });
        }
        let total = answer
            .pointer("/metadata/total_matches")
            .and_then(Value::as_u64);
        let reached = self.offset.saturating_add(got);
        let last = match total {
            _ if got == 0 => true,
            Some(total) => reached >= total,
            None => got < self.page,
        };
        let overlap = self.overlap() as usize;
        self.tail = ids[ids.len().saturating_sub(overlap)..]
            .iter()
            .flatten()
            .copied()
            .collect();
        let fresh: Vec<Value> = entities
            .into_iter()
            .zip(ids)
            .filter(|(_, id)| id.is_none_or(|id| self.seen.insert(id)))
            .map(|(entity, _)| entity)
            .collect();
        if self.handed.saturating_add(fresh.len() as u64) > MAX_LISTED as u64 {
            return Err(ListError::TooMany);
        }
        if fresh.is_empty() && !last {
            return Err(ListError::Repeated {
                offset: self.offset,
            });
        }
        self.handed += fresh.len() as u64;
        if !last {
            self.offset = reached.saturating_sub(overlap as u64).max(self.offset + 1);
        }
        Ok(Page {
            entities: fresh,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nutanix::payload::{parse_vm, Vm};
    use crate::nutanix::pruned;
    use serde_json::json;

    /// The VMs and the end of a listing, as the client reads them.
    fn vms_of(answer: Value) -> Result<(Vec<Option<Vm>>, bool), ListError> {
        // Pages of three, as many as the listing below holds: only its
        // total says whether it is the last.
        let page = Listing::new(3).add(answer)?;
        Ok((page.entities.iter().map(parse_vm).collect(), page.last))
    }

    /// The notification tests compare the two reads of an intent member by
    /// member; this holds the listing's own members to it.
    #[test]
    fn a_vm_listing_read_for_its_vms_answers_as_the_whole_one() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nutanix");
        let intents: Vec<Value> = ["vm_on.json", "vm_update_nic_ip.json", "vm_delete_full.json"]
            .iter()
            .map(|name| {
                let body: Value =
                    serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap();
                body["data"]["metadata"].clone()
            })
            .collect();
        let page = json!({
            "api_version": "3.1",
            "metadata": { "kind": "vm", "offset": 0, "length": 3, "total_matches": 3 },
            "entities": intents,
        });
        let others = [
            json!(null),
            json!({}),
            json!([]),
            json!(""),
            json!(7),
            json!(-1),
            json!([1]),
            json!({ "x": 1 }),
        ];
        let mut variants = vec![page.clone()];
        for pointer in [
            "/entities",
            "/metadata",
            "/metadata/total_matches",
            "/entities/0",
            "/entities/1/metadata",
            "/entities/2/status",
        ] {
            for other in &others {
                let mut variant = page.clone();
                *variant.pointer_mut(pointer).unwrap() = other.clone();
                variants.push(variant);
            }
        }
        for member in ["entities", "metadata"] {
            let mut variant = page.clone();
            variant.as_object_mut().unwrap().remove(member);
            variants.push(variant);
        }
        for variant in variants {
            let bytes = serde_json::to_vec(&variant).unwrap();
            let quick = vms_of(pruned::read(&bytes, &VM_LIST).unwrap());
            let whole = vms_of(serde_json::from_slice(&bytes).unwrap());
            assert_eq!(quick, whole, "{variant}");
        }
    }

    #[test]
    fn error_answers_become_one_readable_reason() {
        let not_found = br#"{"api_version":"3.1","code":404,"kind":"webhook","message_list":[{"message":"ENTITY_NOT_FOUND: webhook : x does not exist.","reason":"ENTITY_NOT_FOUND","details":{}}],"state":"ERROR"}"#;
        assert_eq!(
            error_reason(http::StatusCode::NOT_FOUND, not_found, &[]),
            "ENTITY_NOT_FOUND: webhook : x does not exist. (404)"
        );
        let blank = br#"{"code":400,"message_list":[{"message":"This field may not be blank.","reason":"INVALID"}]}"#;
        assert_eq!(
            error_reason(http::StatusCode::BAD_REQUEST, blank, &[]),
            "INVALID: This field may not be blank. (400)"
        );
        assert_eq!(
            error_reason(http::StatusCode::UNAUTHORIZED, b"<html>401</html>", &[]),
            "authentication failed (401)"
        );
        assert_eq!(normalise_state("kComplete"), "COMPLETE");
        assert_eq!(normalise_state("PENDING"), "PENDING");
    }

    #[test]
    fn an_error_message_of_a_megabyte_is_cut_to_the_bound() {
        let body = json!({ "message": "é".repeat(500_000) }).to_string();
        let reason = error_reason(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            body.as_bytes(),
            &[],
        );
        assert!(reason.len() <= MAX_REASON + " (500)".len() + '…'.len_utf8());
        assert!(reason.ends_with("… (500)"), "{reason}");
    }

    #[test]
    fn a_secret_echoed_across_the_bound_is_redacted_whole_not_cut_in_two() {
        let secret = "s3cret-Password-echoed";
        // The secret starts a few bytes before the cut.
        let message = format!("{}{secret} and more", "x".repeat(MAX_REASON - 6));
        let body = json!({ "message": message }).to_string();
        let reason = error_reason(http::StatusCode::BAD_REQUEST, body.as_bytes(), &[secret]);
        // What survives the cut is the start of the marker, not of the secret.
        assert!(!reason.contains(&secret[..6]), "{reason}");
        assert!(reason.contains("x<redac…"), "{reason}");
        let intent =
            json!({ "status": { "message_list": [{ "message": message, "reason": "X" }] } });
        let status = status_messages(&intent, &["", secret]).unwrap();
        assert!(!status.contains(&secret[..6]), "{status}");
    }

    #[test]
    fn a_listing_ends_at_total_matches_at_a_short_page_or_at_an_empty_one() {
        let page = |n: usize, total: Option<u64>| {
            let entities: Vec<Value> = (0..n).map(|i| json!({ "i": i })).collect();
            match total {
                Some(t) => json!({ "entities": entities, "metadata": { "total_matches": t } }),
                None => json!({ "entities": entities }),
            }
        };
        let last = |r: Result<Page, ListError>| r.map(|p| p.last);
        let mut by_total = Listing::new(2);
        let first = by_total.add(page(2, Some(3))).unwrap();
        assert_eq!(first.entities, vec![json!({ "i": 0 }), json!({ "i": 1 })]);
        assert!(!first.last);
        assert_eq!(by_total.offset(), 1, "the next page reads one entity again");
        assert_eq!(last(by_total.add(page(2, Some(3)))), Ok(true));

        let mut by_short_page = Listing::new(2);
        assert_eq!(last(by_short_page.add(page(2, None))), Ok(false));
        assert_eq!(last(by_short_page.add(page(1, None))), Ok(true));

        // A total that is never reached still ends at the first empty page.
        let mut lying = Listing::new(2);
        assert_eq!(last(lying.add(page(2, Some(100)))), Ok(false));
        assert_eq!(
            lying.add(json!({ "metadata": { "total_matches": 100 } })),
            Ok(Page {
                entities: vec![],
                last: true
            })
        );
        assert_eq!(lying.offset(), 1);

        assert_eq!(
            Listing::new(2).add(json!({ "entities": {} })),
            Err(ListError::NotAList)
        );
    }

    /// Prism's VM list as a server pages it: `length` entities from
    /// `offset`, and the total, of whatever `vms` holds at the time.
    fn serve(vms: &[String], offset: u64, length: u64) -> Value {
        let entities: Vec<Value> = vms
            .iter()
            .skip(offset as usize)
            .take(length as usize)
            .map(|uuid| json!({ "metadata": { "uuid": uuid } }))
            .collect();
        json!({ "entities": entities, "metadata": { "total_matches": vms.len() } })
    }

    fn uuid(i: usize) -> String {
        format!("{i:08x}-0000-4000-8000-000000000000")
    }

    /// Reads a whole listing of pages of 10, calling `between` after each
    /// page with the page's number; the uuids handed out, in order.
    fn list(
        vms: &mut Vec<String>,
        mut between: impl FnMut(usize, &mut Vec<String>),
    ) -> Result<Vec<String>, ListError> {
        let mut listing = Listing::new(10);
        let mut out = Vec::new();
        for n in 0.. {
            let page = listing.add(serve(vms, listing.offset(), listing.page()))?;
            out.extend(
                page.entities
                    .iter()
                    .map(|e| str_at(e, "/metadata/uuid").unwrap().to_owned()),
            );
            if page.last {
                break;
            }
            between(n, vms);
        }
        Ok(out)
    }

    #[test]
    fn a_vm_deleted_from_an_earlier_page_while_listing_does_not_hide_a_later_one() {
        let all: Vec<String> = (0..35).map(uuid).collect();
        let mut vms = all.clone();
        // After the first page, the first VM goes: the rest move one place
        // down, and without the overlap `uuid(10)` would never be read.
        let listed = list(&mut vms, |n, vms| {
            if n == 0 {
                vms.remove(0);
            }
        })
        .unwrap();
        assert_eq!(listed, all, "every VM once, in order");
    }

    #[test]
    fn a_vm_created_before_the_listings_place_is_not_handed_out_twice() {
        let mut vms: Vec<String> = (0..25).map(uuid).collect();
        let listed = list(&mut vms, |n, vms| {
            if n == 0 {
                vms.insert(0, uuid(1000));
            }
        })
        .unwrap();
        let expected: Vec<String> = (0..25).map(uuid).collect();
        assert_eq!(listed, expected, "the new VM is the next event's to bring");
    }

    #[test]
    fn more_deletions_than_the_overlap_or_a_server_ignoring_offset_fail_the_listing() {
        let mut vms: Vec<String> = (0..40).map(uuid).collect();
        let shifted = list(&mut vms, |n, vms| {
            if n == 0 {
                vms.drain(0..2);
            }
        });
        assert_eq!(
            shifted,
            Err(ListError::Shifted {
                offset: 8,
                overlap: 2
            })
        );

        let vms: Vec<String> = (0..40).map(uuid).collect();
        let mut listing = Listing::new(10);
        let same_page = || serve(&vms, 0, 10);
        assert!(!listing.add(same_page()).unwrap().last);
        let error = listing.add(same_page()).unwrap_err();
        assert_eq!(error, ListError::Repeated { offset: 8 });
        assert!(error.to_string().contains("ignore `offset`"), "{error}");
    }

    #[test]
    fn a_listing_that_never_ends_is_refused_at_the_bound() {
        let mut listing = Listing::new(100_000);
        let full = json!({ "entities": vec![Value::Null; 100_000] });
        let mut pages = 0;
        let error = loop {
            match listing.add(full.clone()).map(|p| p.last) {
                Ok(false) => pages += 1,
                Ok(true) => panic!("a full page without a total never ends a listing"),
                Err(e) => break e,
            }
        };
        assert_eq!(error, ListError::TooMany);
        assert_eq!(pages, MAX_LISTED / 100_000);
    }
}
