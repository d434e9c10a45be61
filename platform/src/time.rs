//! Instants as the platform writes them: FHIR `instant`, millisecond precision, UTC.

use time::{OffsetDateTime, UtcOffset};

/// FHIR instant text, millisecond precision, UTC (`2026-11-28T09:33:43.123Z`).
pub fn instant(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second(), t.millisecond())
}

/// Now, truncated to what [`instant`] writes, with its text: a change's time as stored and served.
pub fn now_in_millis() -> (OffsetDateTime, String) {
    let now = OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(now.millisecond() as u32 * 1_000_000).unwrap_or(now);
    (now, instant(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_utc_with_milliseconds() {
        let t = time::macros::datetime!(2026-11-28 10:33:43.123456 +01:00);
        assert_eq!(instant(t), "2026-11-28T09:33:43.123Z");
        let (now, text) = now_in_millis();
        assert_eq!(now.nanosecond() % 1_000_000, 0);
        assert_eq!(text, instant(now));
    }
}
