//! What gridtalk writes back to a person after an answer, in their language: the free-form text
//! (inside the 24-hour window) and the shorter note the confirmation template carries (outside
//! it). German and Spanish for contacts whose language is one of those, English otherwise; the
//! request's id is always cited as the request showed it.

/// Which reply, with what it cites.
pub(crate) enum Wording<'a> {
    /// A decision recorded: `title` is the button as the person saw it.
    Recorded { title: &'a str, id: &'a str },
    /// A later decision, not recorded; `standing` is the answer that stands.
    AlreadyAnswered {
        title: &'a str,
        id: &'a str,
        standing: &'a str,
    },
    /// A "new ETA" tap: the date is asked for.
    AskForEta { id: &'a str },
    /// Any other tap on a request that text may continue.
    Noted { title: &'a str, id: &'a str },
}

/// The text and the template note of `wording` in `language` (a contact's, e.g. `de_DE`).
pub(crate) fn words(language: Option<&str>, wording: Wording<'_>) -> (String, String) {
    let language = language.unwrap_or("en").get(..2).unwrap_or("en");
    match (language, wording) {
        ("de", Wording::Recorded { title, id }) => (
            format!("Danke, Ihre Antwort „{title}“ zu {id} ist erfasst."),
            format!("Ihre Antwort „{title}“ ist erfasst."),
        ),
        ("es", Wording::Recorded { title, id }) => (
            format!("Gracias, su respuesta «{title}» sobre {id} quedó registrada."),
            format!("su respuesta «{title}» quedó registrada."),
        ),
        (_, Wording::Recorded { title, id }) => (
            format!("Thank you, your answer \"{title}\" on {id} is recorded."),
            format!("your answer {title:?} is recorded."),
        ),
        ("de", Wording::AlreadyAnswered { title, id, standing }) => (
            format!("{id} wurde bereits beantwortet ({standing}); Ihre Antwort „{title}“ wurde daher nicht erfasst. Trotzdem vielen Dank."),
            format!("dies wurde bereits beantwortet ({standing}); Ihre Antwort „{title}“ wurde nicht erfasst."),
        ),
        ("es", Wording::AlreadyAnswered { title, id, standing }) => (
            format!("{id} ya fue respondida ({standing}), por lo que su respuesta «{title}» no se registró. Gracias de todos modos."),
            format!("ya fue respondida ({standing}); su respuesta «{title}» no se registró."),
        ),
        (_, Wording::AlreadyAnswered { title, id, standing }) => (
            format!("{id} was already answered ({standing}), so your answer \"{title}\" was not recorded. Thank you all the same."),
            format!("this was already answered ({standing}), so your answer {title:?} was not recorded."),
        ),
        ("de", Wording::AskForEta { id }) => (
            format!("Danke. Bitte antworten Sie auf diese Nachricht mit dem neuen Liefertermin für {id} als Datum (JJJJ-MM-TT)."),
            "bitte antworten Sie mit dem neuen Liefertermin als Datum (JJJJ-MM-TT).".into(),
        ),
        ("es", Wording::AskForEta { id }) => (
            format!("Gracias. Responda a este mensaje con la nueva fecha estimada de llegada de {id} (AAAA-MM-DD)."),
            "responda con la nueva fecha estimada de llegada (AAAA-MM-DD).".into(),
        ),
        (_, Wording::AskForEta { id }) => (
            format!("Thanks. Please reply to this message with the new ETA for {id} as a date (YYYY-MM-DD)."),
            "please reply with the new ETA as a date (YYYY-MM-DD).".into(),
        ),
        ("de", Wording::Noted { title, id }) => (
            format!("Danke, wir haben „{title}“ zu {id} notiert. Antworten Sie auf diese Nachricht mit weiteren Details."),
            format!("wir haben „{title}“ notiert; antworten Sie mit weiteren Details."),
        ),
        ("es", Wording::Noted { title, id }) => (
            format!("Gracias, anotamos «{title}» sobre {id}. Responda a este mensaje con cualquier detalle."),
            format!("anotamos «{title}»; responda con cualquier detalle."),
        ),
        (_, Wording::Noted { title, id }) => (
            format!("Thanks, we noted \"{title}\" on {id}. Reply to this message with any details."),
            format!("we noted {title:?}; reply with any details."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_german_or_spanish_contact_reads_the_reply_in_their_language_citing_the_request() {
        let recorded = |language| {
            words(
                language,
                Wording::Recorded {
                    title: "Annehmen",
                    id: "PO-4500021",
                },
            )
        };
        assert_eq!(
            recorded(Some("de_DE")).0,
            "Danke, Ihre Antwort „Annehmen“ zu PO-4500021 ist erfasst."
        );
        assert!(recorded(Some("es_MX")).0.contains("quedó registrada"));
        assert_eq!(
            recorded(None),
            recorded(Some("en_US")),
            "English without a language"
        );
        assert!(recorded(Some("fr_FR")).0.ends_with("is recorded."));
        for language in [Some("de_DE"), Some("es_MX"), None] {
            for (text, _) in [
                words(language, Wording::AskForEta { id: "SH-7" }),
                words(
                    language,
                    Wording::Noted {
                        title: "x",
                        id: "SH-7",
                    },
                ),
                words(
                    language,
                    Wording::AlreadyAnswered {
                        title: "x",
                        id: "SH-7",
                        standing: "Approve",
                    },
                ),
            ] {
                assert!(text.contains("SH-7"), "{text}");
            }
        }
    }
}
