//! Layering the configuration, finding every error with its key path, and remembering where each
//! value came from.
//!
//! - Tables merge key by key; `rules` and `templates` merge **by name**: an entry whose name is a
//!   built-in one replaces it in place, a new name is appended (rules keep their order). A layer
//!   that sets `replace_builtin_rules = true` / `replace_builtin_templates = true` replaces the
//!   built-in list instead.
//! - When the merged tree does not deserialize, each value a layer set is tried alone against the
//!   defaults (which always deserialize), descending into tables and list entries, so that every
//!   wrong key is reported with its path in one run, not one per run.
//! - Errors never carry a quoted value from the input: it may be a secret.

use std::collections::BTreeMap;

use crate::Config;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// The configuration file, by its name as given.
    File(String),
    /// The environment variable that set it.
    Env(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(name) => write!(f, "file {name}"),
            Source::Env(var) => write!(f, "env {var}"),
        }
    }
}

/// The source of every value a layer set, by dotted key path (`send.pair_burst`); list entries of
/// `rules` and `templates` by `rules.<name>`. A path not in it is a default.
#[derive(Debug, Clone, Default)]
pub struct Sources(pub BTreeMap<String, Source>);

impl Sources {
    pub fn of(&self, path: &str) -> &Source {
        self.0.get(path).unwrap_or(&Source::Default)
    }

    fn record(&mut self, prefix: &str, value: &toml::Value, source: &Source) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    self.record(&join(prefix, k), v, source);
                }
            }
            toml::Value::Array(items) if NAMED_LISTS.contains(&prefix) => {
                for item in items {
                    if let Some(name) = item.get("name").and_then(|n| n.as_str()) {
                        self.0.insert(join(prefix, name), source.clone());
                    }
                }
            }
            _ => {
                self.0.insert(prefix.to_string(), source.clone());
            }
        }
    }
}

/// Lists whose entries merge by their `name`.
const NAMED_LISTS: &[&str] = &["rules", "templates", "reminders", "summaries"];

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Merges `overlay` into `base` (see the module docs), recording the overlay's values in
/// `sources`.
pub(crate) fn merge_layer(
    base: &mut toml::Table,
    overlay: toml::Table,
    source: &Source,
    sources: &mut Sources,
) {
    sources.record("", &toml::Value::Table(overlay.clone()), source);
    let replace = |list: &str| {
        overlay
            .get(&format!("replace_builtin_{list}"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let (replace_rules, replace_templates) = (replace("rules"), replace("templates"));
    for (key, value) in overlay {
        let replace_list = match key.as_str() {
            "rules" => replace_rules,
            "templates" => replace_templates,
            _ => false,
        };
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (Some(toml::Value::Array(b)), toml::Value::Array(o))
                if NAMED_LISTS.contains(&key.as_str()) && !replace_list =>
            {
                merge_named(b, o)
            }
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn merge_tables(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// Entries of `overlay` replace the entry of `base` with the same name, or are appended.
pub(crate) fn merge_named(base: &mut Vec<toml::Value>, overlay: Vec<toml::Value>) {
    for entry in overlay {
        let name = entry
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        match name.and_then(|n| {
            base.iter()
                .position(|b| b.get("name").and_then(|x| x.as_str()) == Some(n.as_str()))
        }) {
            Some(i) => base[i] = entry,
            None => base.push(entry),
        }
    }
}

/// Whether `tree` deserializes into a [`Config`]; the error without any quoted input value.
pub(crate) fn deserialize(tree: &toml::Table) -> Result<Config, String> {
    toml::Value::Table(tree.clone())
        .try_into::<Config>()
        .map_err(|e| without_quoted_values(e.to_string().trim()))
}

/// Every key of `merged` whose value does not deserialize, each with its path, found by trying
/// it alone against `defaults`.
pub(crate) fn locate_errors(defaults: &toml::Table, merged: &toml::Table) -> Vec<String> {
    let mut errors = Vec::new();
    for (key, value) in merged {
        if defaults.get(key) != Some(value) {
            probe(defaults, std::slice::from_ref(key), value, &mut errors);
        }
    }
    errors
}

fn probe(defaults: &toml::Table, path: &[String], value: &toml::Value, errors: &mut Vec<String>) {
    let mut candidate = defaults.clone();
    set(&mut candidate, path, value.clone());
    let Err(error) = deserialize(&candidate) else {
        return;
    };
    let before = errors.len();
    match (value, get(defaults, path)) {
        (toml::Value::Table(t), Some(toml::Value::Table(_))) => {
            for (k, v) in t {
                let inner = [path, std::slice::from_ref(k)].concat();
                if get(defaults, &inner) != Some(v) {
                    probe(defaults, &inner, v, errors);
                }
            }
        }
        (toml::Value::Array(items), _)
            if path.len() == 1 && NAMED_LISTS.contains(&path[0].as_str()) =>
        {
            for (i, item) in items.iter().enumerate() {
                let mut candidate = defaults.clone();
                set(&mut candidate, path, toml::Value::Array(vec![item.clone()]));
                if let Err(e) = deserialize(&candidate) {
                    let name = item
                        .get("name")
                        .and_then(|n| n.as_str())
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default();
                    errors.push(format!("{}[{i}]{name}: {}", path[0], e.replace('\n', " ")));
                }
            }
        }
        _ => {}
    }
    if errors.len() == before {
        errors.push(format!("{}: {}", path.join("."), error.replace('\n', " ")));
    }
}

fn get<'t>(table: &'t toml::Table, path: &[String]) -> Option<&'t toml::Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    if rest.is_empty() {
        Some(value)
    } else {
        get(value.as_table()?, rest)
    }
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return;
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    if let toml::Value::Table(t) = entry {
        set(t, rest, value);
    }
}

/// `invalid type: string "hunter2", expected u32` → `invalid type: string "…", expected u32`.
pub(crate) fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_quote = false;
    let mut escaped = false;
    for c in message.chars() {
        if in_quote {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    in_quote = false;
                    out.push_str("…\"");
                }
                _ => escaped = false,
            }
        } else {
            out.push(c);
            if c == '"' {
                in_quote = true;
            }
        }
    }
    if in_quote {
        out.push_str("…\"");
    }
    out
}

/// The line (1-based) of `key = …` inside `[section]` of a TOML text, for a two-part path; a best
/// effort for pointing at the line of a semantic error.
pub(crate) fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let [section, key] = path else {
        return None;
    };
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == format!("[{section}]");
        } else if in_section
            && line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(i + 1);
        }
    }
    None
}

/// The configuration as TOML with secrets shown as `***`, each value followed by where it came
/// from.
pub fn render(config: &Config, sources: &Sources) -> String {
    let tree = match toml::Value::try_from(config) {
        Ok(toml::Value::Table(t)) => t,
        _ => return String::from("# the configuration could not be rendered\n"),
    };
    let mut out = String::new();
    let (mut tables, mut lists) = (Vec::new(), Vec::new());
    // Top-level values first: TOML puts them before any table.
    for (key, value) in &tree {
        match value {
            toml::Value::Table(t) => tables.push((key, t)),
            toml::Value::Array(items) if NAMED_LISTS.contains(&key.as_str()) => {
                lists.push((key, items))
            }
            other => out.push_str(&format!("{key} = {other}  # {}\n", sources.of(key))),
        }
    }
    for (key, t) in tables {
        render_table(&mut out, key, t, sources);
    }
    for (key, items) in lists {
        for item in items {
            let name = item.get("name").and_then(|n| n.as_str()).unwrap_or("");
            let source = sources.of(&join(key, name));
            out.push_str(&format!("\n[[{key}]]  # {source}\n"));
            if let Some(t) = item.as_table() {
                let mut nested = toml::Table::new();
                nested.insert(
                    key.clone(),
                    toml::Value::Array(vec![toml::Value::Table(t.clone())]),
                );
                let text = toml::to_string(&nested).unwrap_or_default();
                // The entry's body without its own [[key]] header.
                for line in text
                    .lines()
                    .skip_while(|l| l.trim() == format!("[[{key}]]"))
                {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

fn render_table(out: &mut String, path: &str, table: &toml::Table, sources: &Sources) {
    out.push_str(&format!("\n[{path}]\n"));
    let mut nested = Vec::new();
    for (key, value) in table {
        let full = join(path, key);
        match value {
            toml::Value::Table(t) => nested.push((full, t)),
            other => out.push_str(&format!("{key} = {other}  # {}\n", sources.of(&full))),
        }
    }
    for (full, t) in nested {
        render_table(out, &full, t, sources);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_left_out_of_errors() {
        assert_eq!(
            without_quoted_values(r#"invalid type: string "hunter\"2", expected u32"#),
            r#"invalid type: string "…", expected u32"#
        );
        assert_eq!(
            without_quoted_values("unknown field `x`"),
            "unknown field `x`"
        );
    }

    #[test]
    fn named_entries_replace_or_append() {
        let entry = |name: &str, v: i64| {
            let mut t = toml::Table::new();
            t.insert("name".into(), name.into());
            t.insert("v".into(), v.into());
            toml::Value::Table(t)
        };
        let mut base = vec![entry("a", 1), entry("b", 1)];
        merge_named(&mut base, vec![entry("b", 2), entry("c", 2)]);
        assert_eq!(base, vec![entry("a", 1), entry("b", 2), entry("c", 2)]);
    }

    #[test]
    fn a_key_is_found_in_its_section() {
        let text = "[kafka]\nname = 1\n[send]\n# x\npair_burst = 0\n";
        assert_eq!(line_of(text, &["send", "pair_burst"]), Some(5));
        assert_eq!(line_of(text, &["kafka", "pair_burst"]), None);
    }
}
