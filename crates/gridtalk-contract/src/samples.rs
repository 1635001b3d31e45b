//! Realistic sample events for every event type of the contract, as JSON ready for
//! [`crate::json_to_avro`]. The traffic generator, the tests and `schemas/README.md` use them, so
//! the examples people read are the ones the tests prove.

use serde_json::{json, Value};

pub use crate::event_types::{payload_type_of, EVENT_TYPES};

/// A sample of `event_type` number `seq` from `partner_id`, occurring at `now_ms`.
/// Document numbers derive from `seq`, so distinct `seq` values give distinct documents.
pub fn sample_event(event_type: &str, seq: u64, partner_id: &str, now_ms: i64) -> Option<Value> {
    let day = 86_400_000i64;
    let po = format!("PO-{}", 4_500_000 + seq);
    let invoice = format!("INV-{}", 900_000 + seq);
    let shipment = format!("SH-{}", 700_000 + seq);
    let amount = format!("{}.{:02}", 1_000 + (seq * 7_919) % 90_000, seq % 100);
    let (payload_type, payload, doc_type, document): (&str, Value, &str, String) = match event_type
    {
        "tg.po.received" => (
            "PurchaseOrderReceived",
            json!({"po_number": po, "po_date": now_ms, "buyer_name": "Northwind Retail",
                   "total": {"amount": amount, "currency": "USD"}, "line_count": 3 + (seq % 20) as i64,
                   "requested_ship_date": now_ms + 5 * day, "ack_due_at": now_ms + day}),
            "850",
            po,
        ),
        "tg.po.ack_overdue" => (
            "PurchaseOrderAckOverdue",
            json!({"po_number": po, "ack_due_at": now_ms - 6 * 3_600_000, "hours_overdue": 6, "escalation_level": 0}),
            "850",
            po,
        ),
        "tg.po.acknowledged" => (
            "PurchaseOrderAcknowledged",
            json!({"po_number": po, "ack_type": "ACCEPTED", "raw_ack_code": "AC", "acknowledged_at": now_ms}),
            "855",
            po,
        ),
        "tg.invoice.delivered"
        | "tg.invoice.acknowledged"
        | "tg.invoice.rejected"
        | "tg.invoice.correction_required" => {
            let (status, ack, raw, source, reason) = match event_type {
                "tg.invoice.delivered" => ("DELIVERED", "UNKNOWN", None, None, None),
                "tg.invoice.acknowledged" => {
                    ("ACKNOWLEDGED", "ACCEPTED", Some("A"), Some("FA_997"), None)
                }
                "tg.invoice.rejected" => (
                    "REJECTED",
                    "REJECTED",
                    Some("R"),
                    Some("AR_824"),
                    Some("Unit price differs from PO line 2"),
                ),
                _ => (
                    "CORRECTION_REQUIRED",
                    "UNKNOWN",
                    Some("IR"),
                    Some("AR_824"),
                    Some("Missing remit-to address (N1*RI)"),
                ),
            };
            (
                "InvoiceStatusChanged",
                json!({"invoice_number": invoice, "po_number": po, "total": {"amount": amount, "currency": "EUR"},
                       "status": status, "ack_code": ack, "raw_ack_code": raw, "rejection_source": source,
                       "reason": reason,
                       "correction_deadline": if status == "CORRECTION_REQUIRED" { json!(now_ms + 2 * day) } else { Value::Null }}),
                "810",
                invoice,
            )
        }
        "tg.asn.sent"
        | "tg.delivery.confirmed"
        | "tg.shipment.status_updated"
        | "tg.shipment.exception" => {
            let (status, raw, kind, detail): (&str, Option<&str>, Option<&str>, Option<&str>) =
                match event_type {
                    "tg.asn.sent" => ("ASN_SENT", None, None, None),
                    "tg.delivery.confirmed" => ("DELIVERED", Some("D1"), None, None),
                    "tg.shipment.status_updated" => (
                        "IN_TRANSIT",
                        Some("X6"),
                        None,
                        Some("En route to destination"),
                    ),
                    _ => (
                        "EXCEPTION",
                        Some("SD"),
                        Some("DELAYED"),
                        Some("Carrier reports weather delay at hub"),
                    ),
                };
            (
                "ShipmentEvent",
                json!({"shipment_id": shipment, "po_numbers": [po], "carrier_scac": "ODFL", "bol": format!("BOL{}", 10_000 + seq),
                       "pro_number": format!("PRO{}", 550_000 + seq), "status": status, "raw_status_code": raw,
                       "exception_kind": kind, "detail": detail, "location": "Memphis, TN",
                       "eta": now_ms + 2 * day, "quantity_expected": 120, "quantity_actual": if kind.is_some() { 96 } else { 120 }}),
                "856",
                shipment,
            )
        }
        "tg.onboarding.reminder" => (
            "OnboardingReminder",
            json!({"onboarding_id": format!("ONB-{}", 300 + seq), "stage": "DOCS_PENDING",
                   "items_missing": ["W9", "COI"], "due_on": now_ms + 3 * day,
                   "upload_link": format!("https://portal.example.com/onboarding/ONB-{}", 300 + seq)}),
            "ONBOARDING",
            format!("ONB-{}", 300 + seq),
        ),
        "tg.document.validation_failed" | "tg.document.delivery_failed" => {
            let (stage, status, code, text) = if event_type == "tg.document.validation_failed" {
                (
                    "TRANSLATION",
                    "Translation Error",
                    "TE-017",
                    "Segment N1*ST missing mandatory element N104",
                )
            } else {
                (
                    "DELIVERY",
                    "Send Failed",
                    "DF-503",
                    "AS2 endpoint returned 503; 3 attempts failed",
                )
            };
            (
                "DocumentFailure",
                json!({"document_number": invoice, "doc_type": "810", "stage": stage, "tg_status": status,
                       "error_code": code, "error_text": text, "suggested_fix": "Correct the map and resubmit"}),
                "810",
                invoice,
            )
        }
        "wf.approval.requested" => (
            "ApprovalRequested",
            json!({"approval_id": format!("APR-{}", 8_000 + seq), "kind": "ORDER_CHANGE",
                   "subject": format!("{po} change 1"), "summary": "Quantity on line 2 raised from 40 to 55 cases",
                   "amount_delta": {"amount": "412.50", "currency": "USD"},
                   "approver_contact_ids": ["buyer-maria"], "expires_at": now_ms + day}),
            "860",
            format!("APR-{}", 8_000 + seq),
        ),
        "wf.case.opened" | "wf.case.updated" => (
            "CaseEvent",
            json!({"case_id": format!("CASE-{}", 1_200 + seq), "category": "SHIPMENT",
                   "status": if event_type == "wf.case.opened" { "OPEN" } else { "PENDING_PARTNER" },
                   "title": format!("Short shipment on {shipment}"),
                   "last_comment": "Please confirm the missing 24 cartons"}),
            "CASE",
            format!("CASE-{}", 1_200 + seq),
        ),
        "ops.summary.published" => (
            "ActivitySummary",
            json!({"period_start": now_ms - day, "period_end": now_ms, "scope": "all",
                   "completed_pos": 42 + (seq % 10) as i64, "pending_invoices": 7, "failed_acknowledgements": 2,
                   "open_exceptions": 3, "link": "https://ops.example.com/daily"}),
            "SUMMARY",
            format!("SUM-{seq}"),
        ),
        _ => return None,
    };
    let severity = match event_type {
        "tg.document.validation_failed"
        | "tg.document.delivery_failed"
        | "tg.shipment.exception" => "CRITICAL",
        "tg.invoice.rejected" | "tg.po.ack_overdue" => "WARNING",
        _ => "INFO",
    };
    Some(json!({
        "event_id": format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", seq.wrapping_mul(2_654_435_761) as u32, seq % 0xFFFF, seq % 0xFFF, (seq / 7) % 0xFFF, seq),
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": now_ms,
        "producer": if event_type.starts_with("wf.") { "WORKFLOW" } else { "TG_LENS" },
        "tenant_buid": "GC00804444LX",
        "correlation_id": format!("{partner_id}|{doc_type}|{document}"),
        "causation_id": null,
        "severity": severity,
        "partner": {"partner_id": partner_id, "name": null, "trading_address": format!("ZZ:{partner_id}"), "role": "SUPPLIER"},
        "edi": {"standard": "X12", "doc_type": doc_type, "version": "004010", "direction": "INBOUND",
                "interchange_control_number": format!("{:09}", 100_000 + seq), "group_control_number": format!("{}", 2_000 + seq),
                "transaction_set_control_number": format!("{:04}", seq % 10_000), "tg_transaction_id": format!("TG{:012}", seq),
                "sender_address": format!("ZZ:{partner_id}"), "receiver_address": "ZZ:NORTHWIND"},
        "payload": {payload_type: payload}
    }))
}

/// One response of each kind the converse stage publishes, as it publishes them at `now_ms`:
/// answers to the sample requests (taps and texts), and a delivery status.
pub fn sample_responses(now_ms: i64) -> Vec<crate::WorkflowResponse> {
    use crate::{ResponseBody, WorkflowResponse};
    let response = |wamid: &str,
                    response_type: &str,
                    correlation_id: &str,
                    request: Option<(&str, &str)>,
                    contact: &str,
                    body: ResponseBody| WorkflowResponse {
        response_id: wamid.into(),
        response_type: response_type.into(),
        correlation_id: correlation_id.into(),
        in_reply_to_event_id: request.map(|(event, _)| event.to_string()),
        request_id: request.map(|(_, id)| id.to_string()),
        contact_id: Some(contact.into()),
        partner_id: Some("ACME".into()),
        wa_message_id: wamid.into(),
        wa_context_message_id: request.map(|_| format!("{wamid}-request")),
        received_at: now_ms,
        body,
    };
    vec![
        response(
            "wamid.HBgLMTU1NTAxMDAwMDEVAgASGBQzQUE1",
            "wa.po.ack_decision",
            "ACME|850|PO-4500001",
            Some(("9e3779b1-0001-4001-8000-000000000001", "PO-4500001")),
            "acme-order-desk",
            ResponseBody::PoAckDecision {
                po_number: "PO-4500001".into(),
                decision: "ACCEPT".into(),
                comment: None,
            },
        ),
        response(
            "wamid.HBgLMTU1NTAxMDAwMDIVAgASGBQzQUI2",
            "wa.invoice.correction_ack",
            "ACME|810|INV-900006",
            Some(("b54cda26-0006-4006-8000-000000000006", "INV-900006")),
            "acme-billing",
            ResponseBody::CorrectionAnswer {
                document_key: "INV-900006".into(),
                answer: "WILL_RESEND".into(),
                new_eta: None,
                comment: None,
            },
        ),
        response(
            "wamid.HBgLMTU1NTAxMDAwMDMVAgASGBQzQUM3",
            "wa.shipment.exception_response",
            "ACME|856|SH-700010",
            Some(("2e2ac0ea-000a-400a-8001-00000000000a", "SH-700010")),
            "acme-dispatch",
            ResponseBody::CorrectionAnswer {
                document_key: "SH-700010".into(),
                answer: "NEW_ETA".into(),
                new_eta: Some(1_795_773_600_000),
                comment: Some("New ETA 2026-11-26, the hub reopened".into()),
            },
        ),
        response(
            "wamid.HBgLMTU1NTAxMDAwMDQVAgASGBQzQUQ4",
            "wa.onboarding.acknowledged",
            "ACME|ONBOARDING|ONB-311",
            Some(("cc623a9b-000b-400b-8001-00000000000b", "ONB-311")),
            "acme-onboarding",
            ResponseBody::OnboardingAcknowledgement {
                onboarding_id: "ONB-311".into(),
                action: "WILL_SUBMIT".into(),
                item_code: None,
                comment: None,
            },
        ),
        response(
            "wamid.HBgLMTQxNTU1NTAxMDEVAgASGBQzQUU5",
            "wa.approval.decided",
            "ACME|860|APR-8014",
            Some(("a708a7ae-000e-400e-8002-00000000000e", "APR-8014")),
            "buyer-maria",
            ResponseBody::ApprovalDecision {
                approval_id: "APR-8014".into(),
                decision: "APPROVE".into(),
                comment: None,
            },
        ),
        response(
            "wamid.HBgLMTU1NTAxMDAwMDUVAgASGBQzQUYx",
            "wa.case.message_received",
            "ACME|CASE|CASE-1215",
            Some(("4540215f-000f-400f-8002-00000000000f", "CASE-1215")),
            "acme-support",
            ResponseBody::CaseMessage {
                case_id: Some("CASE-1215".into()),
                text: "24 cartons found at the cross-dock, shipping today".into(),
            },
        ),
        response(
            "wamid.HBgLMTU1NTAxMDAwMDEVAgASGBQzQUcy",
            "wa.request.comment",
            "ACME|850|PO-4500001",
            Some(("9e3779b1-0001-4001-8000-000000000001", "PO-4500001")),
            "acme-order-desk",
            ResponseBody::CaseMessage {
                case_id: Some("PO-4500001".into()),
                text: "Line 3 ships a week later".into(),
            },
        ),
        WorkflowResponse {
            response_id: "overdue:po:PO-4500002:2".into(),
            response_type: "wa.request.overdue".into(),
            correlation_id: "ACME|850|PO-4500002".into(),
            in_reply_to_event_id: Some("9e3779b1-0002-4002-8000-000000000002".into()),
            request_id: Some("PO-4500002".into()),
            contact_id: None,
            partner_id: Some("ACME".into()),
            wa_message_id: String::new(),
            wa_context_message_id: None,
            received_at: now_ms,
            body: ResponseBody::RequestOverdue {
                request_kind: "po".into(),
                policy: "a-po-acknowledgement".into(),
                step: 2,
                steps: 3,
                escalation: false,
                due_at: now_ms - 4 * 3_600_000,
                hours_overdue: 4,
                notified_contact_ids: vec!["acme-order-desk".into()],
                trigger: "CLOCK".into(),
            },
        },
        WorkflowResponse {
            response_id: "wamid.HBgLMTU1NTAxMDAwMDEVAgARGBJBQUE1:read".into(),
            response_type: "wa.message.status".into(),
            correlation_id: "ACME|850|PO-4500001".into(),
            in_reply_to_event_id: Some("9e3779b1-0001-4001-8000-000000000001".into()),
            request_id: Some("PO-4500001".into()),
            contact_id: Some("acme-order-desk".into()),
            partner_id: Some("ACME".into()),
            wa_message_id: "wamid.HBgLMTU1NTAxMDAwMDEVAgARGBJBQUE1".into(),
            wa_context_message_id: None,
            received_at: now_ms,
            body: ResponseBody::DeliveryStatus {
                status: "READ".into(),
                error_code: None,
                error_title: None,
            },
        },
    ]
}

/// One audit record of each stage: a forged button refused by converse, a webhook with a bad
/// signature refused by ingest.
pub fn sample_audits(now_ms: i64) -> Vec<crate::AuditRecord> {
    vec![
        crate::AuditRecord {
            audit_id: "wamid.HBgLMTQxNTU1NTAxMDEVAgASGBQzQUgz:token_forged".into(),
            reason: "token_forged".into(),
            stage: "converse".into(),
            detail: "button \"Approve\": button token signature does not match".into(),
            wa_id: Some("14155550101".into()),
            contact_id: None,
            request_id: Some("APR-8014".into()),
            action: Some("REJECT".into()),
            correlation_id: Some("ACME|860|APR-8014".into()),
            wa_message_id: Some("wamid.HBgLMTQxNTU1NTAxMDEVAgASGBQzQUgz".into()),
            at: now_ms,
        },
        crate::AuditRecord {
            audit_id: format!("webhook:5d41402abc4b2a76b9719d91:{now_ms}"),
            reason: "bad_signature".into(),
            stage: "ingest".into(),
            detail: "invalid X-Hub-Signature-256 on a 58-byte body (sha256 prefix 5d41402abc4b2a76b9719d91); refused with 401 unread".into(),
            wa_id: None,
            contact_id: None,
            request_id: None,
            action: None,
            correlation_id: None,
            wa_message_id: None,
            at: now_ms,
        },
    ]
}
