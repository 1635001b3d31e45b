//! The partner and contact directory: who works for which partner, in which roles, at which phone
//! number, in which language, and whether they opted in to WhatsApp.
//!
//! Two sources: a TOML file (the baseline, read at start-up) and a compacted Kafka topic whose
//! records override or delete entries (key `partner:<id>` or `contact:<id>`, JSON value, null value
//! deletes). Every route and converse instance reads the whole topic (it is not partitioned work), from the
//! beginning, and is ready only once it has caught up with the topic's end.
//!
//! The model and [`Directory::apply`] are pure (fuzzed by the `directory_record` target); the
//! topic reader is the `kafka` feature (on by default), so the parsers build without librdkafka.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use gridtalk_contract::DeadLetterReason;

mod hours;
#[cfg(feature = "kafka")]
mod tail;
pub use hours::BusinessHours;
#[cfg(feature = "kafka")]
pub use tail::{open, tail_directory};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Partner {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub trading_addresses: Vec<String>,
    /// The partner's business hours, for its contacts that set none of their own (see
    /// [`Contact::time_zone`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_hours: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub business_days: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub id: String,
    pub name: String,
    /// E.164, with or without `+`. Empty for a group.
    #[serde(default)]
    pub phone: String,
    /// A WhatsApp group (the Cloud API's Groups endpoints) instead of a person: messages go to
    /// the group (`recipient_type: group`). Its members joined by invite; it receives only
    /// messages that ask for no answer (groups cannot show buttons), so requests stay one to one.
    /// Its roles make it part of role audiences like a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whatsapp_group_id: Option<String>,
    /// Preferred template language, e.g. `de_DE`.
    #[serde(default)]
    pub language: Option<String>,
    /// Only contacts who opted in receive WhatsApp messages.
    #[serde(default)]
    pub opted_in: bool,
    /// The partner this contact works for; none for the company's own people.
    #[serde(default)]
    pub partner: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// IANA time zone (`Asia/Tokyo`); with `business_hours` (`09:00-18:00`, local) and
    /// `business_days` (`Mon`…`Sun`, default Monday to Friday), messages that are not urgent wait
    /// for the window. Unset: the partner's; neither: no quiet hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_hours: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub business_days: Vec<String>,
}

/// Where WhatsApp delivers a contact's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A person: the digits of their E.164 number (WhatsApp's `to`).
    Phone(String),
    /// A WhatsApp group, by its group id.
    Group(String),
}

impl Address {
    /// What the Cloud API's `to` and the webhooks' `recipient_id` carry.
    pub fn id(&self) -> &str {
        match self {
            Address::Phone(digits) => digits,
            Address::Group(id) => id,
        }
    }
}

impl Contact {
    /// Where WhatsApp delivers this contact's messages; an error names what is wrong (a phone
    /// WhatsApp cannot reach, a group id that is not one, or both set).
    pub fn address(&self) -> Result<Address, String> {
        match &self.whatsapp_group_id {
            Some(_) if !self.phone.trim().is_empty() => {
                Err("a contact is a phone or a group, not both".into())
            }
            Some(id) => {
                let plausible = !id.is_empty()
                    && id.len() <= 256
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '.'));
                if plausible {
                    Ok(Address::Group(id.clone()))
                } else {
                    Err(format!(
                        "whatsapp_group_id {id:?} is not a WhatsApp group id"
                    ))
                }
            }
            None => gridtalk_whatsapp::normalize_phone(&self.phone).map(Address::Phone),
        }
    }

    /// Whether this contact is a WhatsApp group.
    pub fn is_group(&self) -> bool {
        self.whatsapp_group_id.is_some()
    }
}

/// The business hours a zone, a window and days describe, if both a zone and a window are set.
fn hours_of(
    zone: Option<&String>,
    window: Option<&String>,
    days: &[String],
) -> Option<Result<BusinessHours, String>> {
    Some(BusinessHours::parse(zone?, window?, days))
}

impl Partner {
    fn hours(&self) -> Option<Result<BusinessHours, String>> {
        hours_of(
            self.time_zone.as_ref(),
            self.business_hours.as_ref(),
            &self.business_days,
        )
    }
}

/// The file format.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryFile {
    #[serde(default)]
    pub partners: Vec<Partner>,
    #[serde(default)]
    pub contacts: Vec<Contact>,
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    partners: HashMap<String, Partner>,
    contacts: HashMap<String, Contact>,
}

impl Directory {
    pub fn from_file_data(file: DirectoryFile) -> Self {
        let mut d = Directory::default();
        for p in file.partners {
            d.partners.insert(p.id.clone(), p);
        }
        for c in file.contacts {
            d.contacts.insert(c.id.clone(), c);
        }
        d
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The directory a file's text describes (TOML, [`DirectoryFile`]).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: DirectoryFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(Self::from_file_data(file))
    }

    /// Applies one directory-topic record. A record it cannot apply is refused with the
    /// dead-letter reason and why, and the entry is left as it was: a key that is not
    /// `partner:<id>` / `contact:<id>` or a value that is not such an entry is
    /// `malformed_directory_record`; a contact whose phone is not a number WhatsApp can reach is
    /// `invalid_phone` here, once, instead of at every event for that contact.
    pub fn apply(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), (DeadLetterReason, String)> {
        let malformed = |detail: String| (DeadLetterReason::MalformedDirectoryRecord, detail);
        let (kind, id) = key
            .split_once(':')
            .ok_or_else(|| malformed(format!("key {key:?} is not kind:id")))?;
        match (kind, value) {
            ("partner", None) => {
                self.partners.remove(id);
            }
            ("contact", None) => {
                self.contacts.remove(id);
            }
            ("partner", Some(v)) => {
                let p: Partner =
                    serde_json::from_slice(v).map_err(|e| malformed(format!("{key}: {e}")))?;
                if let Some(Err(e)) = p.hours() {
                    return Err(malformed(format!("{key}: {e}")));
                }
                self.partners.insert(id.to_string(), p);
            }
            ("contact", Some(v)) => {
                let c: Contact =
                    serde_json::from_slice(v).map_err(|e| malformed(format!("{key}: {e}")))?;
                if let Err(e) = c.address() {
                    return Err((
                        DeadLetterReason::InvalidPhone,
                        format!("{key}: phone {:?}: {e}", c.phone),
                    ));
                }
                if let Some(Err(e)) = own_hours(&c) {
                    return Err(malformed(format!("{key}: {e}")));
                }
                self.contacts.insert(id.to_string(), c);
            }
            _ => {
                return Err(malformed(format!(
                    "key {key:?}: kind must be partner or contact"
                )))
            }
        }
        Ok(())
    }

    pub fn partner(&self, id: &str) -> Option<&Partner> {
        self.partners.get(id)
    }

    pub fn contact(&self, id: &str) -> Option<&Contact> {
        self.contacts.get(id)
    }

    /// The business hours a contact's messages wait for: its own zone, window and days where it
    /// sets them, else its partner's; none when no zone or no window results (or a setting
    /// that does not parse, which the directory refuses when it is loaded).
    pub fn business_hours(&self, contact: &Contact) -> Option<BusinessHours> {
        let partner = contact
            .partner
            .as_deref()
            .and_then(|p| self.partners.get(p));
        let zone = contact
            .time_zone
            .as_ref()
            .or(partner.and_then(|p| p.time_zone.as_ref()));
        let window = contact
            .business_hours
            .as_ref()
            .or(partner.and_then(|p| p.business_hours.as_ref()));
        let days = if contact.business_days.is_empty() {
            partner.map_or(&[][..], |p| &p.business_days[..])
        } else {
            &contact.business_days[..]
        };
        hours_of(zone, window, days)?.ok()
    }

    /// Contacts of `partner` (or internal ones when `None`) having any of `roles`, sorted by id.
    pub fn with_roles(&self, partner: Option<&str>, roles: &[String]) -> Vec<&Contact> {
        let mut found: Vec<&Contact> = self
            .contacts
            .values()
            .filter(|c| {
                c.partner.as_deref() == partner && c.roles.iter().any(|r| roles.contains(r))
            })
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// The contact whose phone number is the WhatsApp id `wa_id` (digits of E.164), if any.
    /// Numbers in the directory are compared after the same normalisation as when sending.
    pub fn contact_by_wa_id(&self, wa_id: &str) -> Option<&Contact> {
        let mut found: Vec<&Contact> = self
            .contacts
            .values()
            .filter(|c| c.address().is_ok_and(|a| a.id() == wa_id))
            .collect();
        // One number shared by two directory entries is ambiguous: the lowest id decides, stably.
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found.into_iter().next()
    }

    /// Every problem of a directory file's text, each naming the entry: TOML or field errors,
    /// duplicate partner or contact ids (a later entry would silently replace an earlier one),
    /// phones WhatsApp cannot reach, contacts of partners the file does not define.
    pub fn lint_toml(text: &str) -> Vec<String> {
        let file: DirectoryFile = match toml::from_str(text) {
            Ok(file) => file,
            Err(e) => return vec![e.to_string().trim().replace('\n', " ")],
        };
        let mut problems = Vec::new();
        let mut partners = std::collections::HashSet::new();
        for (i, p) in file.partners.iter().enumerate() {
            if p.id.trim().is_empty() {
                problems.push(format!("partners[{i}]: the id is empty"));
            } else if !partners.insert(p.id.as_str()) {
                problems.push(format!("partners[{i}]: id {:?} is defined twice", p.id));
            }
            if let Some(Err(e)) = p.hours() {
                problems.push(format!("partners[{i}] ({}): {e}", p.id));
            }
        }
        let mut contacts = std::collections::HashSet::new();
        for (i, c) in file.contacts.iter().enumerate() {
            if c.id.trim().is_empty() {
                problems.push(format!("contacts[{i}]: the id is empty"));
            } else if !contacts.insert(c.id.as_str()) {
                problems.push(format!("contacts[{i}]: id {:?} is defined twice", c.id));
            }
            if let Err(e) = c.address() {
                problems.push(format!("contacts[{i}] ({}).phone {:?}: {e}", c.id, c.phone));
            }
            if let Some(Err(e)) = own_hours(c) {
                problems.push(format!("contacts[{i}] ({}): {e}", c.id));
            }
            if let Some(partner) = &c.partner {
                if !partners.contains(partner.as_str()) {
                    problems.push(format!(
                        "contacts[{i}] ({}).partner: partner {partner:?} is not in the directory",
                        c.id
                    ));
                }
            }
        }
        problems
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.partners.len(), self.contacts.len())
    }
}

/// A contact's own settings, checked alone: a zone without a window (or the reverse) is
/// completed by the partner's, so only what is set is checked.
fn own_hours(c: &Contact) -> Option<Result<BusinessHours, String>> {
    if let Some(zone) = &c.time_zone {
        if let Err(e) = BusinessHours::parse(zone, "00:00-23:59", &c.business_days) {
            return Some(Err(e));
        }
    }
    if let Some(window) = &c.business_hours {
        if let Err(e) = BusinessHours::parse("UTC", window, &c.business_days) {
            return Some(Err(e));
        }
    }
    None
}

/// The directory shared between the tailing task and the route stage.
pub type SharedDirectory = Arc<RwLock<Directory>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_a_contact_addressed_by_its_group_id_and_never_also_a_phone() {
        let mut d = Directory::default();
        let group = br#"{"id": "ops-room", "name": "Operations room", "opted_in": true,
                         "whatsapp_group_id": "Y2FwaV9ncm91cDoxMjM0", "roles": ["operations"]}"#;
        d.apply("contact:ops-room", Some(group)).expect("applies");
        let found = d
            .contact_by_wa_id("Y2FwaV9ncm91cDoxMjM0")
            .expect("by group id");
        assert!(found.is_group());
        assert_eq!(
            found.address(),
            Ok(Address::Group("Y2FwaV9ncm91cDoxMjM0".into()))
        );
        assert_eq!(d.with_roles(None, &["operations".to_string()]).len(), 1);
        let both = br#"{"id": "x", "name": "X", "phone": "+14155550101", "opted_in": true,
                        "whatsapp_group_id": "Y2FwaV9ncm91cDoxMjM0"}"#;
        let (reason, _) = d.apply("contact:x", Some(both)).expect_err("both");
        assert_eq!(reason, DeadLetterReason::InvalidPhone);
        let bogus =
            br#"{"id": "y", "name": "Y", "opted_in": true, "whatsapp_group_id": "not a group!"}"#;
        assert!(d.apply("contact:y", Some(bogus)).is_err());
        let problems = Directory::lint_toml(
            "[[contacts]]\nid = \"g\"\nname = \"G\"\nwhatsapp_group_id = \"Y2Fw\"\nopted_in = true\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn records_it_cannot_apply_are_refused_with_their_reason_and_change_nothing() {
        let mut d = Directory::default();
        let good = br#"{"id": "c1", "name": "One", "phone": "+1 415 555 0101", "language": "en_US",
                        "opted_in": true, "roles": ["billing"]}"#;
        d.apply("contact:c1", Some(good)).expect("applies");
        let cases: [(&str, &[u8], DeadLetterReason); 4] = [
            (
                "contact:c1",
                br#"{"id": "c1", "name": "One", "phone": "+1-555-CALL-ME", "language": "en_US",
                     "opted_in": true, "roles": ["billing"]}"#,
                DeadLetterReason::InvalidPhone,
            ),
            (
                "contact:c1",
                b"not json",
                DeadLetterReason::MalformedDirectoryRecord,
            ),
            (
                "no-colon",
                b"{}",
                DeadLetterReason::MalformedDirectoryRecord,
            ),
            (
                "robot:r1",
                b"{}",
                DeadLetterReason::MalformedDirectoryRecord,
            ),
        ];
        for (key, value, reason) in cases {
            let refused = d.apply(key, Some(value)).expect_err(key);
            assert_eq!(refused.0, reason, "{key}: {}", refused.1);
        }
        assert_eq!(d.contact("c1").expect("kept").phone, "+1 415 555 0101");
    }
}
