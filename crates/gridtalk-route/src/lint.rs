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
    problems.extend(reminder_problems(config));
    for event_type in &config.route.urgent_event_types {
        if gridtalk_contract::payload_type_of(event_type).is_none() {
            problems.push(format!(
                "route.urgent_event_types: {event_type} is not an event type of the contract"
            ));
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

/// The reminder policies' pointers against the events they read: the request id in the opening,
/// closing and upstream events, the due time in the opening ones, and the pointers of the
/// reminder and escalation templates (those into `/reminder`, which gridtalk adds, excepted).
fn reminder_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for policy in &config.reminders {
        let at = format!("reminders.{}", policy.name);
        let mut template_pointers: Vec<(String, &str)> = Vec::new();
        for name in std::iter::once(&policy.reminder_template).chain(&policy.escalation_template) {
            if let Some(t) = config.templates.iter().find(|t| &t.name == name) {
                template_pointers.push((
                    format!("templates.{}.document_key", t.name),
                    &t.document_key,
                ));
                for (i, p) in t.body.iter().enumerate() {
                    if p.default.is_none() {
                        template_pointers
                            .push((format!("templates.{}.body[{i}].path", t.name), &p.path));
                    }
                }
            }
        }
        template_pointers.retain(|(_, p)| !p.starts_with("/reminder/"));
        let groups: [(&str, &Vec<String>); 3] = [
            ("event_types", &policy.event_types),
            ("closed_by", &policy.closed_by),
            ("upstream_overdue", &policy.upstream_overdue),
        ];
        for (list, event_types) in groups {
            for event_type in event_types {
                if gridtalk_contract::payload_type_of(event_type).is_none() {
                    problems.push(format!(
                        "{at}.{list}: {event_type} is not an event type of the contract"
                    ));
                    continue;
                }
                let mut pointers =
                    vec![(format!("{at}.request_path"), policy.request_path.as_str())];
                if list == "event_types" {
                    if let Some(due) = &policy.due_path {
                        pointers.push((format!("{at}.due_path"), due));
                    }
                    pointers.extend(template_pointers.iter().map(|(p, v)| (p.clone(), *v)));
                }
                for (path, pointer) in pointers {
                    if let Err(e) = gridtalk_contract::check_pointer(event_type, pointer) {
                        problems.push(format!(
                            "{path}: {e} (used by reminder policy {})",
                            policy.name
                        ));
                    }
                }
            }
        }
        // The answer's buttons name the request by the request template's document key: the clock
        // must be keyed by the same value, or no answer would ever stop it.
        for rule in config
            .rules
            .iter()
            .filter(|r| r.event_types.iter().any(|t| policy.event_types.contains(t)))
        {
            if let Some(t) = config
                .templates
                .iter()
                .find(|t| t.name == rule.template && !t.buttons.is_empty())
            {
                if t.document_key != policy.request_path {
                    problems.push(format!(
                        "{at}.request_path: {} differs from template {}'s document_key {} (rule {}): answers would not stop the clock",
                        policy.request_path, t.name, t.document_key, rule.name
                    ));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reminder_policy_keyed_unlike_its_request_is_reported() {
        let mut config = Config::load(None, Vec::new()).expect("defaults load");
        let policy = config
            .reminders
            .iter_mut()
            .find(|p| p.name == "a-po-acknowledgement")
            .expect("the PO policy");
        policy.request_path = "/payload/buyer_name".into();
        policy.due_path = Some("/payload/ack_due".into());
        let problems = pointer_problems(&config);
        assert!(
            problems.iter().any(|p| p.starts_with(
                "reminders.a-po-acknowledgement.request_path: /payload/buyer_name differs"
            )),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("reminders.a-po-acknowledgement.due_path")),
            "{problems:?}"
        );
    }

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
