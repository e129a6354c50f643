//! Whatever Prism answers: a listing ends (complete, refused or bounded),
//! every entity is read without panicking, a VM listing's page read for its
//! VMs alone gives what the whole page gives, and an error answer becomes a
//! reason of bounded length.
//!
//! Input: a page size byte, then the list answers and last the error body,
//! separated by NUL (which JSON text cannot hold), so fixtures are seeds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prismhook_core::nutanix::payload::parse_vm;
use prismhook_core::nutanix::pruned;
use prismhook_core::nutanix::v3::{
    error_reason, parse_webhook, status_messages, Listing, MAX_LISTED, MAX_REASON, VM_LIST,
};
use serde_json::Value;

/// A reason of at most MAX_REASON bytes, the ellipsis and ` (NNN)`.
const REASON_BOUND: usize = MAX_REASON + '…'.len_utf8() + " (999)".len();

fuzz_target!(|data: &[u8]| {
    let Some((&page, rest)) = data.split_first() else {
        return;
    };
    let mut parts: Vec<&[u8]> = rest.split(|&b| b == 0).collect();
    let error_body = parts.pop().unwrap_or_default();
    let page = u64::from(page.max(1));
    for body in &parts {
        let whole = serde_json::from_slice::<Value>(body).ok();
        let quick = pruned::read(body, &VM_LIST).ok();
        assert_eq!(quick.is_some(), whole.is_some());
        if let (Some(quick), Some(whole)) = (quick, whole) {
            let vms = |answer| {
                Listing::new(page)
                    .add(answer)
                    .map(|p| (p.entities.iter().map(parse_vm).collect::<Vec<_>>(), p.last))
            };
            assert_eq!(vms(quick), vms(whole));
        }
    }
    let mut listing = Listing::new(page);
    let mut entities = Vec::new();
    for body in &parts {
        let Ok(answer) = serde_json::from_slice::<Value>(body) else {
            break;
        };
        let before = listing.offset();
        match listing.add(answer) {
            Err(_) => break,
            Ok(page) => {
                // The offset moves on, and only a page that ends the
                // listing may hand out nothing new: it cannot go on forever
                // without growing towards the bound.
                let last = page.last;
                assert!(last || listing.offset() > before);
                assert!(last || !page.entities.is_empty());
                entities.extend(page.entities);
                if last {
                    break;
                }
            }
        }
    }
    assert!(entities.len() <= MAX_LISTED);
    // No entity is handed out twice, however the pages overlap.
    let mut uuids = std::collections::HashSet::new();
    for uuid in entities
        .iter()
        .filter_map(|e| e.pointer("/metadata/uuid")?.as_str())
    {
        assert!(uuids.insert(uuid), "{uuid} handed out twice");
    }
    for entity in &entities {
        if let Some(vm) = parse_vm(entity) {
            assert!(!vm.uuid.is_empty());
        }
        if let Some(hook) = parse_webhook(entity) {
            assert!(!hook.uuid.is_empty());
            assert_eq!(hook.state, hook.state.to_ascii_uppercase());
        }
        if let Some(reason) = status_messages(entity, &[]) {
            assert!(reason.len() <= MAX_REASON + '…'.len_utf8());
        }
    }
    for status in [http::StatusCode::NOT_FOUND, http::StatusCode::UNAUTHORIZED] {
        let reason = error_reason(status, error_body, &[]);
        assert!(reason.len() <= REASON_BOUND, "{} bytes", reason.len());
    }
});
