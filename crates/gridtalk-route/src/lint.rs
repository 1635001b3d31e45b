//! Checks of the routing rules against the event contract, made before any event arrives: every
//! JSON pointer a rule or its template reads must address something in the events the rule
//! applies to.

use gridtalk_config::Config;

/// Every pointer of every rule (amount, condition, audience) and of its template (document key,
/// body parameters without a default) that cannot address a field of one of the rule's event
/// types, and every event type the contract does not know; each with the rule or template path.
pub fn pointer_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for rule in &config.rules {
        let template = config.templates.iter().find(|t| t.name == rule.template);
        let mut pointers: Vec<(String, &str)> = Vec::new();
        for (what, pointer) in [
            ("amount_path", &rule.amount_path),
            ("when_path", &rule.when_path),
            ("audience.contacts_from", &rule.audience.contacts_from),
        ] {
            if let Some(pointer) = pointer {
                pointers.push((format!("rules.{}.{what}", rule.name), pointer));
            }
        }
        if let Some(t) = template {
            pointers.push((
                format!("templates.{}.document_key", t.name),
                &t.document_key,
            ));
            for (i, p) in t.body.iter().enumerate() {
                // A parameter with a default is allowed to be absent.
                if p.default.is_none() {
                    pointers.push((format!("templates.{}.body[{i}].path", t.name), &p.path));
                }
            }
        }
        for event_type in &rule.event_types {
            if gridtalk_contract::payload_type_of(event_type).is_none() {
                problems.push(format!(
                    "rules.{}.event_types: {event_type} is not an event type of the contract",
                    rule.name
                ));
                continue;
            }
            for (path, pointer) in &pointers {
                if let Err(e) = gridtalk_contract::check_pointer(event_type, pointer) {
                    problems.push(format!("{path}: {e} (used by rule {})", rule.name));
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_rules_read_only_fields_their_events_have() {
        let config = Config::load(None, Vec::new()).expect("defaults load");
        assert_eq!(pointer_problems(&config), Vec::<String>::new());
    }

    #[test]
    fn a_misspelled_pointer_is_reported_with_its_template_and_rule() {
        let mut config = Config::load(None, Vec::new()).expect("defaults load");
        let rule = config
            .rules
            .iter()
            .find(|r| r.event_types.iter().any(|t| t == "tg.po.received"))
            .expect("a PO rule")
            .clone();
        let template = config
            .templates
            .iter_mut()
            .find(|t| t.name == rule.template)
            .expect("its template");
        template.body[0].path = "/payload/po_numbr".into();
        template.body[0].default = None;
        let problems = pointer_problems(&config).join("\n");
        assert!(
            problems.contains(&format!("templates.{}.body[0].path", rule.template))
                && problems.contains("po_numbr")
                && problems.contains(&rule.name),
            "{problems}"
        );
    }
}
