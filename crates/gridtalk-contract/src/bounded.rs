//! A bounded walk over Avro binary data, run before `apache-avro` builds any value from bytes that
//! came from outside.
//!
//! `apache-avro` trusts the lengths and counts it reads: an array or map block count of 2^29
//! reserves `count × size_of::<Value>()` bytes before the first item is read (a 31-byte record
//! aborts the process), a writer schema's `fixed` of size 2^40 is allocated as given, and a
//! recursive writer schema (a linked list) with a record nested 200,000 deep overflows the stack.
//! None of that is the record's *error*; it is the decoder's. This walk reads the same grammar as
//! the Avro specification's binary encoding and guarantees, for a record that passes it:
//!
//! - every length (strings, bytes, `fixed` sizes) fits in the bytes that are left;
//! - the array and map items of the whole record together number at most the record's length in
//!   bytes, so what the decoder reserves is bounded by the record's own size (every item takes at
//!   least one byte, except items of zero-width types such as `null`; a record that declares more
//!   of those than it has bytes is refused);
//! - values are nested at most [`MAX_DEPTH`] deep, so decoding, resolving and dropping the value
//!   cannot overflow the stack;
//! - the datum ends exactly at the end of the bytes (nothing missing at the end: `apache-avro`
//!   would read a missing union index as the null branch; nothing left over);
//! - union branch and enum symbol indices exist, booleans are 0 or 1, varints are at most ten
//!   bytes and `int`s fit 32 bits.
//!
//! The walk allocates nothing and takes time proportional to the record's length.

use std::collections::HashMap;

use apache_avro::schema::{Name, Namespace, ResolvedSchema};
use apache_avro::Schema;

/// How deep values may nest: records, arrays, maps and unions each count a level. gridtalk's own
/// event schema nests five deep; 64 leaves room for any real writer schema and keeps the decoder's
/// recursion far from the stack's end.
pub const MAX_DEPTH: usize = 64;

/// Checks that `body` is exactly one datum of `schema`, within the bounds above. The error says
/// what is wrong and where (byte offset), for the dead-letter detail.
pub fn check_datum(schema: &Schema, body: &[u8]) -> Result<(), String> {
    let resolved = ResolvedSchema::try_from(schema).map_err(|e| format!("writer schema: {e}"))?;
    let mut walk = Walk {
        names: resolved.get_names(),
        bytes: body,
        at: 0,
        items_left: body.len(),
    };
    walk.datum(schema, &None, 0)?;
    if walk.at != body.len() {
        return Err(format!(
            "{} trailing bytes after the record (it ends at byte {})",
            body.len() - walk.at,
            walk.at
        ));
    }
    Ok(())
}

struct Walk<'a, 's> {
    names: &'a HashMap<Name, &'s Schema>,
    bytes: &'a [u8],
    at: usize,
    /// Array and map items the record may still declare (see the module docs).
    items_left: usize,
}

impl Walk<'_, '_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        if n > self.left() {
            return Err(format!(
                "{what} of {n} bytes at byte {} but only {} bytes are left",
                self.at,
                self.left()
            ));
        }
        let start = self.at;
        self.at += n;
        Ok(&self.bytes[start..self.at])
    }

    /// A zig-zag varint of at most ten bytes.
    fn long(&mut self, what: &str) -> Result<i64, String> {
        let start = self.at;
        let mut raw: u64 = 0;
        for shift in (0..70).step_by(7) {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(format!(
                    "{what} at byte {start}: the record ends inside or before it"
                ));
            };
            self.at += 1;
            if shift == 63 && byte > 1 {
                return Err(format!("{what} at byte {start}: varint overflows 64 bits"));
            }
            raw |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
            }
        }
        Err(format!(
            "{what} at byte {start}: varint longer than ten bytes"
        ))
    }

    fn int(&mut self, what: &str) -> Result<i32, String> {
        let start = self.at;
        let value = self.long(what)?;
        i32::try_from(value).map_err(|_| format!("{what} at byte {start}: {value} is not an int"))
    }

    fn length(&mut self, what: &str) -> Result<usize, String> {
        let start = self.at;
        let len = self.long(what)?;
        let len = usize::try_from(len)
            .map_err(|_| format!("{what} at byte {start}: negative length {len}"))?;
        if len > self.left() {
            return Err(format!(
                "{what} at byte {start}: length {len} but only {} bytes are left",
                self.left()
            ));
        }
        Ok(len)
    }

    fn skip_bytes(&mut self, what: &str) -> Result<(), String> {
        let len = self.length(what)?;
        self.take(len, what).map(|_| ())
    }

    /// The item count of the next array or map block (0 ends the sequence), charged against the
    /// record's item allowance before a single item is read.
    fn block_count(&mut self, what: &str) -> Result<usize, String> {
        let start = self.at;
        let raw = self.long(what)?;
        let count = if raw < 0 {
            // A negative count is followed by the block's size in bytes, which must fit too.
            self.length(what)?;
            raw.checked_neg()
                .ok_or_else(|| format!("{what} at byte {start}: block count overflows"))?
        } else {
            raw
        };
        let count = usize::try_from(count).expect("non-negative count");
        if count > self.items_left {
            return Err(format!(
                "{what} at byte {start}: a block of {count} items, more than the record's {} bytes can hold",
                self.bytes.len()
            ));
        }
        self.items_left -= count;
        Ok(count)
    }

    fn datum(
        &mut self,
        schema: &Schema,
        namespace: &Namespace,
        depth: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "values nested more than {MAX_DEPTH} deep at byte {}",
                self.at
            ));
        }
        match schema {
            Schema::Null => Ok(()),
            Schema::Boolean => match self.take(1, "boolean")?[0] {
                0 | 1 => Ok(()),
                other => Err(format!(
                    "boolean at byte {} is {other}, not 0 or 1",
                    self.at - 1
                )),
            },
            Schema::Int | Schema::Date | Schema::TimeMillis => self.int("int").map(|_| ()),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.long("long").map(|_| ()),
            Schema::Float => self.take(4, "float").map(|_| ()),
            Schema::Double => self.take(8, "double").map(|_| ()),
            Schema::Duration => self.take(12, "duration").map(|_| ()),
            Schema::Bytes | Schema::BigDecimal | Schema::Uuid => self.skip_bytes("bytes"),
            Schema::String => self.skip_bytes("string"),
            Schema::Fixed(fixed) => self.take(fixed.size, "fixed").map(|_| ()),
            Schema::Decimal(decimal) => self.datum(&decimal.inner, namespace, depth),
            Schema::Enum(e) => {
                let start = self.at;
                let index = self.int("enum index")?;
                if usize::try_from(index).is_ok_and(|i| i < e.symbols.len()) {
                    Ok(())
                } else {
                    Err(format!(
                        "enum index {index} at byte {start}: {} has {} symbols",
                        e.name.name,
                        e.symbols.len()
                    ))
                }
            }
            Schema::Union(union) => {
                let start = self.at;
                let index = self.long("union index")?;
                let variants = union.variants();
                let branch = usize::try_from(index)
                    .ok()
                    .and_then(|i| variants.get(i))
                    .ok_or_else(|| {
                        format!(
                            "union index {index} at byte {start}: the union has {} branches",
                            variants.len()
                        )
                    })?;
                self.datum(branch, namespace, depth + 1)
            }
            Schema::Array(array) => loop {
                let count = self.block_count("array block count")?;
                if count == 0 {
                    return Ok(());
                }
                for _ in 0..count {
                    self.datum(&array.items, namespace, depth + 1)?;
                }
            },
            Schema::Map(map) => loop {
                let count = self.block_count("map block count")?;
                if count == 0 {
                    return Ok(());
                }
                for _ in 0..count {
                    self.skip_bytes("map key")?;
                    self.datum(&map.types, namespace, depth + 1)?;
                }
            },
            Schema::Record(record) => {
                let inner = record.name.fully_qualified_name(namespace).namespace;
                for field in &record.fields {
                    self.datum(&field.schema, &inner, depth + 1)?;
                }
                Ok(())
            }
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(namespace);
                let target = self
                    .names
                    .get(&full)
                    .ok_or_else(|| format!("writer schema names {full} but never defines it"))?;
                // A reference does not nest a value by itself; the record it names counts.
                self.datum(target, &full.namespace, depth)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Schema {
        Schema::parse_str(text).expect("test schema")
    }

    /// Zig-zag varint, as a writer would put it.
    fn varint(value: i64) -> Vec<u8> {
        let mut raw = ((value << 1) ^ (value >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let byte = (raw & 0x7F) as u8;
            raw >>= 7;
            if raw == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn accepts_what_apache_avro_writes() {
        let s = schema(
            r#"{"type":"record","name":"R","namespace":"t","fields":[
                {"name":"a","type":{"type":"array","items":"string"}},
                {"name":"m","type":{"type":"map","values":"long"}},
                {"name":"u","type":["null","R"]},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
                {"name":"f","type":{"type":"fixed","name":"F","size":3}},
                {"name":"n","type":{"type":"array","items":"null"}},
                {"name":"b","type":"boolean"},
                {"name":"d","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}}
            ]}"#,
        );
        use apache_avro::types::Value;
        let leaf = |next: Value| {
            Value::Record(vec![
                (
                    "a".into(),
                    Value::Array(vec![Value::String("x".into()), Value::String("yz".into())]),
                ),
                (
                    "m".into(),
                    Value::Map([("k".to_string(), Value::Long(-5))].into_iter().collect()),
                ),
                ("u".into(), next),
                ("e".into(), Value::Enum(1, "Y".into())),
                ("f".into(), Value::Fixed(3, vec![1, 2, 3])),
                ("n".into(), Value::Array(vec![Value::Null; 3])),
                ("b".into(), Value::Boolean(true)),
                (
                    "d".into(),
                    Value::Decimal(apache_avro::Decimal::from(vec![0x01, 0x00])),
                ),
            ])
        };
        let value = leaf(Value::Union(
            1,
            Box::new(leaf(Value::Union(0, Box::new(Value::Null)))),
        ));
        let bytes = apache_avro::to_avro_datum(&s, value).expect("encodes");
        check_datum(&s, &bytes).expect("what apache-avro writes passes");
        assert!(check_datum(&s, &bytes[..bytes.len() - 1]).is_err(), "cut");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(check_datum(&s, &longer).unwrap_err().contains("trailing"));
    }

    /// The examples of the Avro specification's "Binary Encoding" section, byte for byte.
    #[test]
    fn the_specifications_binary_examples_pass_and_fail_when_cut() {
        let cases: [(&str, &[u8]); 5] = [
            // Record {"a": 27, "b": "foo"} with fields a: long, b: string.
            (
                r#"{"type":"record","name":"test","fields":[{"name":"a","type":"long"},{"name":"b","type":"string"}]}"#,
                &[0x36, 0x06, 0x66, 0x6f, 0x6f],
            ),
            // Array of longs [3, 27].
            (
                r#"{"type":"array","items":"long"}"#,
                &[0x04, 0x06, 0x36, 0x00],
            ),
            // Union ["null","string"]: null, then "a".
            (r#"["null","string"]"#, &[0x00]),
            (r#"["null","string"]"#, &[0x02, 0x02, 0x61]),
            // String "foo".
            (r#""string""#, &[0x06, 0x66, 0x6f, 0x6f]),
        ];
        for (text, bytes) in cases {
            let s = schema(text);
            check_datum(&s, bytes).unwrap_or_else(|e| panic!("{text}: {e}"));
            if bytes.len() > 1 {
                assert!(
                    check_datum(&s, &bytes[..bytes.len() - 1]).is_err(),
                    "{text} cut"
                );
            }
        }
    }

    #[test]
    fn negative_block_counts_with_sizes_are_read() {
        let s = schema(r#"{"type":"array","items":"int"}"#);
        // -2 items, 2 bytes, then 1 and 2, then the end.
        let mut bytes = varint(-2);
        bytes.extend(varint(2));
        bytes.extend(varint(1));
        bytes.extend(varint(2));
        bytes.push(0);
        check_datum(&s, &bytes).expect("negative block count");
        let value = apache_avro::from_avro_datum(&s, &mut &bytes[..], None).expect("decodes");
        assert_eq!(
            value,
            apache_avro::types::Value::Array(vec![
                apache_avro::types::Value::Int(1),
                apache_avro::types::Value::Int(2)
            ])
        );
    }

    #[test]
    fn huge_block_counts_are_refused_before_any_item() {
        for (text, what) in [
            (r#"{"type":"array","items":"long"}"#, "array"),
            (r#"{"type":"map","values":"long"}"#, "map"),
            (r#"{"type":"array","items":"null"}"#, "array"),
        ] {
            let s = schema(text);
            for count in [1i64 << 29, -(1i64 << 29), i64::MAX, 5] {
                let mut bytes = varint(count);
                if count < 0 {
                    bytes.extend(varint(1));
                }
                let error = check_datum(&s, &bytes).unwrap_err();
                assert!(error.contains(what), "{text} {count}: {error}");
            }
        }
        // i64::MIN has no positive counterpart.
        let s = schema(r#"{"type":"array","items":"long"}"#);
        let mut bytes = varint(i64::MIN);
        bytes.extend(varint(0));
        assert!(check_datum(&s, &bytes).is_err());
    }

    #[test]
    fn lengths_beyond_the_record_are_refused() {
        let s = schema(r#"{"type":"record","name":"R","fields":[{"name":"s","type":"string"}]}"#);
        assert!(check_datum(&s, &varint(1 << 40))
            .unwrap_err()
            .contains("length"));
        assert!(check_datum(&s, &varint(-3))
            .unwrap_err()
            .contains("negative"));
        let fixed = schema(r#"{"type":"fixed","name":"Huge","size":1099511627776}"#);
        assert!(check_datum(&fixed, &[0; 16]).unwrap_err().contains("fixed"));
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing_into_it() {
        let list = schema(
            r#"{"type":"record","name":"Node","fields":[
                {"name":"v","type":"int"},{"name":"next","type":["null","Node"]}]}"#,
        );
        // 200,000 nodes: value 0, branch 1 (another node), ... then branch 0.
        let mut bytes = Vec::new();
        for _ in 0..200_000 {
            bytes.extend([0x00, 0x02]);
        }
        bytes.extend([0x00, 0x00]);
        let error = check_datum(&list, &bytes).unwrap_err();
        assert!(error.contains("nested"), "{error}");
        // A short list is fine.
        check_datum(&list, &[0x02, 0x02, 0x04, 0x00]).expect("two nodes");
    }

    #[test]
    fn indices_booleans_and_varints_are_checked() {
        let union = schema(r#"["null","string"]"#);
        assert!(check_datum(&union, &varint(2))
            .unwrap_err()
            .contains("union"));
        assert!(check_datum(&union, &varint(-1))
            .unwrap_err()
            .contains("union"));
        assert!(check_datum(&union, &[]).unwrap_err().contains("ends"));
        let e = schema(r#"{"type":"enum","name":"E","symbols":["A"]}"#);
        assert!(check_datum(&e, &varint(1)).unwrap_err().contains("enum"));
        let b = schema(r#""boolean""#);
        assert!(check_datum(&b, &[2]).unwrap_err().contains("boolean"));
        let int = schema(r#""int""#);
        assert!(check_datum(&int, &varint(1 << 40))
            .unwrap_err()
            .contains("int"));
        let long = schema(r#""long""#);
        assert!(check_datum(&long, &[0xFF; 11]).is_err());
        assert!(check_datum(
            &long,
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02]
        )
        .is_err());
        check_datum(&long, &varint(i64::MIN)).expect("i64::MIN");
        check_datum(&long, &varint(i64::MAX)).expect("i64::MAX");
    }
}
