//! Any answer a firewall (or something in its place) sends: reading it never
//! panics, and a failure's reason stays bounded however long the message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prismhook_plugin_paloalto::host::Response;
use prismhook_plugin_paloalto::response::{check, registered_ips, MAX_REASON};

fuzz_target!(|input: (u16, &[u8])| {
    let (status, body) = input;
    let response = Response {
        status,
        headers: vec![],
        body: body.to_vec(),
    };
    // `…` closes a cut reason: three bytes.
    if let Err(failure) = check(&response) {
        assert!(failure.reason().len() <= MAX_REASON + 3);
    }
    if let Ok(page) = registered_ips(&response) {
        assert!(page.ips.len() <= page.listed);
        for (ip, _) in page.ips {
            assert_eq!(ip, ip.trim());
        }
    }
});
