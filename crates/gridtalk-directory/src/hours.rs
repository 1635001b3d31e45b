//! Business hours: when a contact (or, for its contacts, a partner) may get a message that is not
//! urgent. A time zone (IANA, e.g. `Asia/Tokyo`), a daily window (`09:00-18:00`, local time) and
//! the working days (Monday to Friday unless listed). Pure.
//!
//! [`BusinessHours::next_open`] says when the window next opens, or nothing when it is open now.
//! Local times are resolved in the zone's rules for that date, daylight saving included: a window
//! opening in a skipped hour opens at the first instant after it.

use chrono::{Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

/// A parsed business-hours setting.
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessHours {
    zone: Tz,
    opens: NaiveTime,
    closes: NaiveTime,
    days: Vec<Weekday>,
}

const WEEKDAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Mon),
    ("tue", Weekday::Tue),
    ("wed", Weekday::Wed),
    ("thu", Weekday::Thu),
    ("fri", Weekday::Fri),
    ("sat", Weekday::Sat),
    ("sun", Weekday::Sun),
];

impl BusinessHours {
    /// `time_zone` (IANA), `window` (`HH:MM-HH:MM`, opening before closing) and `days`
    /// (`Mon`…`Sun`; empty: Monday to Friday).
    pub fn parse(time_zone: &str, window: &str, days: &[String]) -> Result<Self, String> {
        let zone: Tz = time_zone.parse().map_err(|_| {
            format!("time zone {time_zone:?} is not an IANA time zone (e.g. Asia/Tokyo)")
        })?;
        let (opens, closes) = window
            .split_once('-')
            .and_then(|(a, b)| {
                Some((
                    NaiveTime::parse_from_str(a.trim(), "%H:%M").ok()?,
                    NaiveTime::parse_from_str(b.trim(), "%H:%M").ok()?,
                ))
            })
            .ok_or_else(|| format!("business hours {window:?} are not HH:MM-HH:MM"))?;
        if opens >= closes {
            return Err(format!(
                "business hours {window:?}: the window must open before it closes"
            ));
        }
        let days = if days.is_empty() {
            WEEKDAYS[..5].iter().map(|(_, d)| *d).collect()
        } else {
            days.iter()
                .map(|d| {
                    let lower = d.to_ascii_lowercase();
                    WEEKDAYS
                        .iter()
                        .find(|(name, _)| lower.starts_with(name))
                        .map(|(_, day)| *day)
                        .ok_or_else(|| format!("business day {d:?} is not Mon…Sun"))
                })
                .collect::<Result<_, _>>()?
        };
        Ok(BusinessHours {
            zone,
            opens,
            closes,
            days,
        })
    }

    fn instant(&self, date: NaiveDate, time: NaiveTime) -> i64 {
        let local = date.and_time(time);
        match self.zone.from_local_datetime(&local) {
            chrono::LocalResult::Single(t) => t.timestamp_millis(),
            chrono::LocalResult::Ambiguous(first, _) => first.timestamp_millis(),
            // Skipped by a daylight-saving change: the first minute after the gap.
            chrono::LocalResult::None => (1..=180)
                .find_map(|m| {
                    self.zone
                        .from_local_datetime(&(local + Duration::minutes(m)))
                        .earliest()
                })
                .map_or(local.and_utc().timestamp_millis(), |t| t.timestamp_millis()),
        }
    }

    /// When the window next opens after `now_ms`, or `None` while it is open.
    pub fn next_open(&self, now_ms: i64) -> Option<i64> {
        let now = Utc.timestamp_millis_opt(now_ms).single()?;
        let today = now.with_timezone(&self.zone).date_naive();
        if self.days.contains(&today.weekday())
            && self.instant(today, self.opens) <= now_ms
            && now_ms < self.instant(today, self.closes)
        {
            return None;
        }
        (0..=7)
            .map(|offset| today + Duration::days(offset))
            .filter(|date| self.days.contains(&date.weekday()))
            .map(|date| self.instant(date, self.opens))
            .find(|opens| *opens > now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn tokyo_at_two_in_the_morning_waits_until_nine() {
        let tokyo = BusinessHours::parse("Asia/Tokyo", "09:00-18:00", &[]).unwrap();
        // Thursday 2026-12-03 02:00 in Tokyo is Wednesday 17:00 UTC.
        assert_eq!(
            tokyo.next_open(at("2026-12-02T17:00:00Z")),
            Some(at("2026-12-03T09:00:00+09:00"))
        );
        assert_eq!(tokyo.next_open(at("2026-12-03T10:00:00+09:00")), None);
        // Friday evening: Monday morning.
        assert_eq!(
            tokyo.next_open(at("2026-12-04T18:00:00+09:00")),
            Some(at("2026-12-07T09:00:00+09:00"))
        );
    }

    #[test]
    fn daylight_saving_is_the_zones_own() {
        let berlin = BusinessHours::parse("Europe/Berlin", "08:00-17:00", &["Sun".into()]).unwrap();
        // Sunday 2026-03-29 the clocks go forward at 02:00; 08:00 is CEST (UTC+2).
        assert_eq!(
            berlin.next_open(at("2026-03-29T03:00:00Z")),
            Some(at("2026-03-29T08:00:00+02:00"))
        );
        let early = BusinessHours::parse("Europe/Berlin", "02:30-17:00", &["Sun".into()]).unwrap();
        // 02:30 does not exist that day: 03:00 CEST.
        assert_eq!(
            early.next_open(at("2026-03-29T00:00:00Z")),
            Some(at("2026-03-29T03:00:00+02:00"))
        );
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        assert!(BusinessHours::parse("Asia/Tokio", "09:00-18:00", &[])
            .unwrap_err()
            .contains("IANA"));
        assert!(BusinessHours::parse("UTC", "9-18", &[]).is_err());
        assert!(BusinessHours::parse("UTC", "18:00-09:00", &[]).is_err());
        assert!(BusinessHours::parse("UTC", "09:00-18:00", &["Funday".into()]).is_err());
    }
}
