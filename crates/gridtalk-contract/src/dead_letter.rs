//! Why a record was dead-lettered: part of the published contract, since operators and tools
//! filter the dead-letter topic by the `gridtalk.dlq.reason` header.

/// Why a record was dead-lettered. The code is the `gridtalk.dlq.reason` header and the `reason`
/// label of `gridtalk_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    MalformedAvro,
    UnknownSchema,
    MissingField,
    Oversized,
    UnknownEventType,
    UnknownPartner,
    NoRecipient,
    InvalidPhone,
    UnknownTemplate,
    WhatsappPermanent,
    WhatsappRetriesExhausted,
    /// Meta asked for a day's wait (131049): the letter's `gridtalk.dlq.retry_not_before` says
    /// when a replay may send it, and replay leaves it alone until then.
    WhatsappRetryLater,
    /// Meta paused or disabled the message's template (132015/132016, or its
    /// `message_template_status_update` webhook): replay once Meta approves it again.
    TemplatePaused,
    MalformedOutbox,
    MalformedWebhookItem,
    /// The schema registry could not serve the record's schema id for `route.registry_wait_max_secs`.
    RegistryUnavailable,
    /// The event occurred longer ago than `route.max_event_age_secs`: never sent to a phone.
    Stale,
    /// A directory-topic record that is not a readable partner or contact.
    MalformedDirectoryRecord,
    /// A decisions-topic record that is not a decision candidate.
    MalformedDecision,
}

impl DeadLetterReason {
    /// Every reason gridtalk writes.
    pub const ALL: [DeadLetterReason; 19] = [
        DeadLetterReason::MalformedAvro,
        DeadLetterReason::UnknownSchema,
        DeadLetterReason::MissingField,
        DeadLetterReason::Oversized,
        DeadLetterReason::UnknownEventType,
        DeadLetterReason::UnknownPartner,
        DeadLetterReason::NoRecipient,
        DeadLetterReason::InvalidPhone,
        DeadLetterReason::UnknownTemplate,
        DeadLetterReason::WhatsappPermanent,
        DeadLetterReason::WhatsappRetriesExhausted,
        DeadLetterReason::WhatsappRetryLater,
        DeadLetterReason::TemplatePaused,
        DeadLetterReason::MalformedOutbox,
        DeadLetterReason::MalformedWebhookItem,
        DeadLetterReason::RegistryUnavailable,
        DeadLetterReason::Stale,
        DeadLetterReason::MalformedDirectoryRecord,
        DeadLetterReason::MalformedDecision,
    ];

    /// The reason whose code is `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MalformedAvro => "malformed_avro",
            DeadLetterReason::UnknownSchema => "unknown_schema",
            DeadLetterReason::MissingField => "missing_field",
            DeadLetterReason::Oversized => "oversized",
            DeadLetterReason::UnknownEventType => "unknown_event_type",
            DeadLetterReason::UnknownPartner => "unknown_partner",
            DeadLetterReason::NoRecipient => "no_recipient",
            DeadLetterReason::InvalidPhone => "invalid_phone",
            DeadLetterReason::UnknownTemplate => "unknown_template",
            DeadLetterReason::WhatsappPermanent => "whatsapp_permanent",
            DeadLetterReason::WhatsappRetriesExhausted => "whatsapp_retries_exhausted",
            DeadLetterReason::WhatsappRetryLater => "whatsapp_retry_later",
            DeadLetterReason::TemplatePaused => "template_paused",
            DeadLetterReason::MalformedOutbox => "malformed_outbox",
            DeadLetterReason::MalformedWebhookItem => "malformed_webhook_item",
            DeadLetterReason::RegistryUnavailable => "registry_unavailable",
            DeadLetterReason::Stale => "stale",
            DeadLetterReason::MalformedDirectoryRecord => "malformed_directory_record",
            DeadLetterReason::MalformedDecision => "malformed_decision",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_names_one_reason() {
        let mut codes: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
        for reason in DeadLetterReason::ALL {
            assert_eq!(DeadLetterReason::from_code(reason.as_str()), Some(reason));
        }
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), DeadLetterReason::ALL.len());
        assert_eq!(DeadLetterReason::from_code("unknown_partnr"), None);
    }
}
