"""Drives the WhatsApp sandbox with pywa, a WhatsApp Cloud API SDK gridtalk shares no code with,
exactly as an application would drive Meta: the SDK is unmodified; only its HTTP client's
requests are pointed at the sandbox instead of graph.facebook.com.

    pywa_conformance.py SANDBOX_URL PHONE_NUMBER_ID TOKEN

Prints one JSON object: what pywa made of each answer (the sent message's id and recipient, or
the error class, code, message and details it parsed).
"""

import json
import sys

import httpx
from pywa import WhatsApp, errors
from pywa.types.templates import TemplateLanguage


def client(sandbox, phone_id, token):
    target = httpx.URL(sandbox)

    def to_sandbox(request):
        request.url = request.url.copy_with(scheme=target.scheme, host=target.host, port=target.port)

    session = httpx.Client(event_hooks={"request": [to_sandbox]})
    return WhatsApp(phone_id=phone_id, token=token, session=session, api_version="25.0")


def outcome(call):
    try:
        sent = call()
        return {"ok": True, "id": sent.id, "to": str(getattr(sent, "to", "") or "")}
    except errors.WhatsAppError as e:
        return {
            "ok": False,
            "class": type(e).__name__,
            "code": e.code,
            "message": e.message,
            "details": e.details,
        }


def main():
    sandbox, phone_id, token = sys.argv[1:4]
    good = client(sandbox, phone_id, token)
    body = [{"type": "text", "text": t} for t in ["2026-11-24", "45", "7", "2", "3"]]
    results = {
        # A template, with the recipient written the way people write numbers.
        "template": outcome(lambda: good.send_template(
            to="+1 (415) 555-0199",
            name="daily_summary",
            language=TemplateLanguage.ENGLISH_US,
            params=[{"type": "BODY", "parameters": body}],
        )),
        # Free-form text outside the 24-hour window: Meta refuses it with 131047.
        "outside_window": outcome(lambda: good.send_message(to="14155550198", text="hello")),
        # A template Meta does not know: 132001.
        "unknown_template": outcome(lambda: good.send_template(
            to="14155550197", name="no_such_template", language=TemplateLanguage.ENGLISH_US,
            params=[{"type": "body", "parameters": body}],
        )),
        # A token Meta cannot parse: 190.
        "bad_token": outcome(lambda: client(sandbox, phone_id, "never-issued").send_template(
            to="14155550196", name="daily_summary", language=TemplateLanguage.ENGLISH_US,
            params=[{"type": "body", "parameters": body}],
        )),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
