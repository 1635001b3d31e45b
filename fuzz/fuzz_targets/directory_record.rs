//! Directory records, as anyone who can write to the directory topic can send them, and the
//! directory file.
//!
//! The first byte picks a mode. A record is `key` 0x00 `value` (no 0x00: a deletion). Applying it
//! must answer, never panic; a refused record must leave the directory exactly as it was; an
//! applied contact must have a phone WhatsApp can reach (or be a group). Any text as the directory file must give
//! a directory or an error.
#![no_main]

use gridtalk_directory::Directory;
use libfuzzer_sys::fuzz_target;

const BASELINE: &str = r#"
[[partners]]
id = "ACME"
name = "Acme Corp"

[[contacts]]
id = "c1"
name = "One"
phone = "+1 415 555 0101"
opted_in = true
partner = "ACME"
roles = ["orders"]
"#;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 4 == 0 {
        if let Ok(directory) = Directory::from_toml(&String::from_utf8_lossy(rest)) {
            let _ = directory.contact_by_wa_id("14155550101");
        }
        return;
    }
    let mut directory = Directory::from_toml(BASELINE).expect("baseline");
    let (key, value) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let key = String::from_utf8_lossy(key);
    let before = format!("{directory:?}");
    match directory.apply(&key, value) {
        Err(_) => assert_eq!(format!("{directory:?}"), before, "a refused record changed it"),
        Ok(()) => {
            if let Some(id) = key.strip_prefix("contact:") {
                if let Some(contact) = directory.contact(id) {
                    contact
                        .address()
                        .expect("an applied contact has a phone WhatsApp can reach, or a group");
                }
            }
        }
    }
    let _ = directory.contact_by_wa_id("14155550101");
    let _ = directory.with_roles(Some("ACME"), &["orders".to_string()]);
});
