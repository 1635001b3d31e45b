//! Whether a JSON pointer can address something in the event view of an event type, judged from
//! the contract's schema alone (no event needed): `gridtalk check` uses it to catch a misspelled
//! `/payload/po_numbr` before the first event is dead-lettered for it.
//!
//! The view (see [`crate::view`]) exposes the envelope's fields, `payload_type`, and under
//! `payload` the fields of the payload record the event type carries. Unions are transparent (a
//! pointer fits if it fits any branch), array segments are indices, map segments any key.

use std::collections::HashMap;

use apache_avro::schema::{Name, RecordSchema};
use apache_avro::Schema;

use crate::event_types::payload_type_of;
use crate::schemas::ContractSchemas;

/// `Ok` when `pointer` can address a value in the view of an `event_type` event; else why not.
pub fn check_pointer(event_type: &str, pointer: &str) -> Result<(), String> {
    let payload_type = payload_type_of(event_type)
        .ok_or_else(|| format!("event type {event_type} is not in the contract"))?;
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "{pointer:?} is not a JSON pointer (it starts with /)"
        ));
    };
    let segments: Vec<String> = rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    let schema = &ContractSchemas::get().trading_grid_event;
    let mut names = HashMap::new();
    collect_names(schema, &mut names);
    let Schema::Record(envelope) = schema else {
        return Err("the event schema is not a record".into());
    };
    match segments.as_slice() {
        [first] if first == "payload_type" => Ok(()),
        [first, tail @ ..] if first == "payload" => {
            let record = names
                .iter()
                .find(|(name, _)| name.name == payload_type)
                .map(|(_, r)| *r)
                .ok_or_else(|| format!("payload record {payload_type} is not in the schema"))?;
            fits_record(record, tail, &names).map_err(|e| {
                format!("{pointer} does not fit {event_type} (payload {payload_type}): {e}")
            })
        }
        _ => fits_record(envelope, &segments, &names)
            .map_err(|e| format!("{pointer} does not fit the event envelope: {e}")),
    }
}

fn collect_names<'s>(schema: &'s Schema, names: &mut HashMap<&'s Name, &'s RecordSchema>) {
    match schema {
        Schema::Record(r) if names.insert(&r.name, r).is_none() => {
            for field in &r.fields {
                collect_names(&field.schema, names);
            }
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        _ => {}
    }
}

fn fits_record(
    record: &RecordSchema,
    segments: &[String],
    names: &HashMap<&Name, &RecordSchema>,
) -> Result<(), String> {
    let Some((first, rest)) = segments.split_first() else {
        return Ok(());
    };
    match record.fields.iter().find(|f| &f.name == first) {
        Some(field) => fits(&field.schema, rest, names),
        None => {
            let known: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
            Err(format!(
                "{} has no field {first:?} (it has {})",
                record.name.name,
                known.join(", ")
            ))
        }
    }
}

fn fits(
    schema: &Schema,
    segments: &[String],
    names: &HashMap<&Name, &RecordSchema>,
) -> Result<(), String> {
    if segments.is_empty() {
        return Ok(());
    }
    match schema {
        Schema::Record(r) => fits_record(r, segments, names),
        Schema::Ref { name } => match names.get(name) {
            Some(r) => fits_record(r, segments, names),
            None => Err(format!("unknown type {}", name.name)),
        },
        Schema::Union(u) => {
            let mut last = Err("no branch has fields".to_string());
            for variant in u.variants() {
                last = fits(variant, segments, names);
                if last.is_ok() {
                    return last;
                }
            }
            last
        }
        Schema::Array(a) => match segments[0].parse::<usize>() {
            Ok(_) => fits(&a.items, &segments[1..], names),
            Err(_) => Err(format!("{:?} is not an array index", segments[0])),
        },
        Schema::Map(m) => fits(&m.types, &segments[1..], names),
        _ => Err(format!(
            "{:?} is inside a value that has no fields",
            segments[0]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_are_checked_against_the_payload_of_the_event_type() {
        assert!(check_pointer("tg.po.received", "/payload/po_number").is_ok());
        assert!(check_pointer("tg.po.received", "/payload/total/amount").is_ok());
        assert!(check_pointer("tg.po.received", "/payload_type").is_ok());
        assert!(check_pointer("tg.po.received", "/partner/partner_id").is_ok());
        let misspelled = check_pointer("tg.po.received", "/payload/po_numbr").unwrap_err();
        assert!(
            misspelled.contains("po_numbr") && misspelled.contains("po_number"),
            "{misspelled}"
        );
        // A field of another event type's payload does not fit.
        assert!(check_pointer("tg.po.received", "/payload/invoice_number").is_err());
        assert!(check_pointer("tg.po.received", "/payload/po_number/deeper").is_err());
        assert!(check_pointer("tg.unknown", "/payload/po_number").is_err());
        assert!(check_pointer("tg.po.received", "payload/po_number").is_err());
    }
}
