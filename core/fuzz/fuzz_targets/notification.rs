//! Any body POSTed to the listener: the notification parser never panics,
//! accepts only what the event path can carry, answers as it does when it
//! builds the whole body (it builds only what it reads), and decodes a body
//! the same whatever its whitespace (the dedupe key depends on that).

#![no_main]

use libfuzzer_sys::fuzz_target;
use prismhook_core::event::is_kind_action;
use prismhook_core::nutanix::payload::{parse_notification, parse_notification_whole};

fuzz_target!(|body: &[u8]| {
    let answer = parse_notification(body).map_err(|e| e.to_string());
    assert_eq!(
        answer,
        parse_notification_whole(body).map_err(|e| e.to_string())
    );
    let Ok(decoded) = answer else {
        return;
    };
    assert!(is_kind_action(&decoded.event_type), "{decoded:?}");
    assert!(!decoded.entity_uuid.is_empty(), "{decoded:?}");
    assert_eq!(
        decoded.entity_kind,
        decoded.entity_kind.to_ascii_lowercase()
    );
    if let Some(vm) = &decoded.vm {
        assert!(!vm.uuid.is_empty(), "{vm:?}");
        assert!(vm.categories.is_sorted(), "{vm:?}");
        for nic in &vm.nics {
            for (i, ip) in nic.ips.iter().enumerate() {
                assert!(!nic.ips[..i].contains(ip), "repeated {ip} in {nic:?}");
            }
        }
    }
    // The same JSON re-serialised compactly is the same notification.
    let value: serde_json::Value = serde_json::from_slice(body).expect("it parsed once");
    let compact = serde_json::to_vec(&value).expect("a Value serialises");
    assert_eq!(parse_notification(&compact).ok(), Some(decoded));
});
