//! The event types of the contract: which payload record carries each, and its flow. Routing
//! validates an event against this table; the samples and the traffic generator walk it.

/// Every event type the contract defines, with the payload record that carries it and its flow.
pub const EVENT_TYPES: &[(&str, &str, char)] = &[
    ("tg.po.received", "PurchaseOrderReceived", 'a'),
    ("tg.po.ack_overdue", "PurchaseOrderAckOverdue", 'a'),
    ("tg.po.acknowledged", "PurchaseOrderAcknowledged", 'a'),
    ("tg.invoice.delivered", "InvoiceStatusChanged", 'b'),
    ("tg.invoice.acknowledged", "InvoiceStatusChanged", 'b'),
    ("tg.invoice.rejected", "InvoiceStatusChanged", 'b'),
    (
        "tg.invoice.correction_required",
        "InvoiceStatusChanged",
        'b',
    ),
    ("tg.asn.sent", "ShipmentEvent", 'c'),
    ("tg.delivery.confirmed", "ShipmentEvent", 'c'),
    ("tg.shipment.status_updated", "ShipmentEvent", 'c'),
    ("tg.shipment.exception", "ShipmentEvent", 'c'),
    ("tg.onboarding.reminder", "OnboardingReminder", 'd'),
    ("tg.document.validation_failed", "DocumentFailure", 'e'),
    ("tg.document.delivery_failed", "DocumentFailure", 'e'),
    ("wf.approval.requested", "ApprovalRequested", 'f'),
    ("wf.case.opened", "CaseEvent", 'g'),
    ("wf.case.updated", "CaseEvent", 'g'),
    ("ops.summary.published", "ActivitySummary", 'h'),
];

/// The payload record name that carries `event_type`, if the contract knows the type.
pub fn payload_type_of(event_type: &str) -> Option<&'static str> {
    EVENT_TYPES
        .iter()
        .find(|(t, _, _)| *t == event_type)
        .map(|(_, p, _)| *p)
}

/// The kind of request an event asks people to answer, as the decisions topic, the settlement and
/// the request clocks name it (`po`, `approval`, …); `notice` when it asks nothing.
pub fn request_kind_of(event_type: &str) -> &'static str {
    match event_type {
        "tg.po.received" | "tg.po.ack_overdue" | "tg.po.acknowledged" => "po",
        "wf.approval.requested" => "approval",
        "tg.onboarding.reminder" => "onboarding",
        "tg.invoice.correction_required" => "invoice",
        "tg.shipment.exception" => "shipment",
        "wf.case.opened" | "wf.case.updated" => "case",
        _ => "notice",
    }
}

/// The flow a message about `event_type` belongs to, as a metric label: the contract's flow
/// letter (`a` … `h`; gridtalk's computed summaries are flow `h`), `reply` for gridtalk's answers
/// to people, `other` for anything else.
pub fn flow_label_of(event_type: &str) -> &'static str {
    const LETTERS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
    if event_type.starts_with("gridtalk.answer.") {
        return "reply";
    }
    if event_type == "gridtalk.summary" {
        return "h";
    }
    EVENT_TYPES
        .iter()
        .find(|(t, _, _)| *t == event_type)
        .and_then(|(_, _, flow)| LETTERS.get((*flow as u8).wrapping_sub(b'a') as usize))
        .copied()
        .unwrap_or("other")
}
