//! The UTC calendar the budgets are kept in: days since 1970-01-01, and calendar months numbered
//! `year * 12 + month - 1` (the `time` crate knows the calendar). The limiter, its state file
//! and the spend figures count periods the same way (the Redis scripts do this arithmetic in
//! Lua, from Redis's own clock).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{Date, Month};

pub const DAY_SECS: u64 = 24 * 60 * 60;

/// The UTC day `wall` falls in.
pub fn utc_day(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / DAY_SECS
}

/// Julian day number of 1970-01-01, where the day numbers start.
const EPOCH_JULIAN_DAY: i64 = 2_440_588;

/// Year, month (1-12) and day of the month (1-31) of a day number; a day beyond the year 9999
/// (which no clock of this process reads) is taken as the last day `time` knows.
pub fn civil(day: u64) -> (u64, u64, u64) {
    let julian = i64::try_from(day)
        .ok()
        .and_then(|day| day.checked_add(EPOCH_JULIAN_DAY))
        .and_then(|julian| i32::try_from(julian).ok());
    let date = julian
        .and_then(|julian| Date::from_julian_day(julian).ok())
        .unwrap_or(Date::MAX);
    (
        u64::try_from(date.year()).unwrap_or(0),
        u64::from(u8::from(date.month())),
        u64::from(date.day()),
    )
}

/// The calendar month a day is in, as `year * 12 + month - 1`.
pub fn month_of(day: u64) -> u64 {
    let (year, month, _) = civil(day);
    year * 12 + month - 1
}

/// The first day of the month after the one `day` is in.
pub fn next_month_start(day: u64) -> u64 {
    let (year, month, day_of_month) = civil(day);
    let length = Month::try_from(month as u8).map_or(31, |month| {
        month.length(i32::try_from(year).unwrap_or(9999))
    });
    day - (day_of_month - 1) + u64::from(length)
}

/// From `wall` to the next UTC midnight.
pub fn until_next_day(wall: SystemTime) -> Duration {
    until(wall, utc_day(wall) + 1)
}

/// From `wall` to the first midnight UTC of the next month.
pub fn until_next_month(wall: SystemTime) -> Duration {
    until(wall, next_month_start(utc_day(wall)))
}

fn until(wall: SystemTime, day: u64) -> Duration {
    let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(day * DAY_SECS).saturating_sub(since)
}

/// `2026-12-07`, as the state files and the spend figures write a day.
pub fn day_text(day: u64) -> String {
    let midnight = UNIX_EPOCH + Duration::from_secs(day.saturating_mul(DAY_SECS));
    humantime::format_rfc3339_seconds(midnight).to_string()[..10].to_string()
}

/// `2026-12`, as the state file and the spend figures write a month.
pub fn month_text(month: u64) -> String {
    format!("{:04}-{:02}", month / 12, month % 12 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> u64 {
        utc_day(humantime::parse_rfc3339(&format!("{text}T12:00:00Z")).unwrap())
    }

    #[test]
    fn days_fall_in_their_calendar_months() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(day("2026-12-31")), (2026, 12, 31));
        assert_eq!(civil(day("2028-02-29")), (2028, 2, 29));
        assert_eq!(civil(day("2000-03-01")), (2000, 3, 1));
        assert_eq!(month_text(month_of(day("2026-12-07"))), "2026-12");
        assert_eq!(month_of(day("2027-01-01")), month_of(day("2026-12-31")) + 1);
        // Every month's length, leap years (2028, 2000) and a century that is not (2100).
        for (last, next) in [
            ("2026-01-31", "2026-02-01"),
            ("2026-02-28", "2026-03-01"),
            ("2028-02-29", "2028-03-01"),
            ("2000-02-29", "2000-03-01"),
            ("2100-02-28", "2100-03-01"),
            ("2026-04-30", "2026-05-01"),
            ("2026-12-31", "2027-01-01"),
        ] {
            assert_eq!(next_month_start(day(last)), day(next), "{last}");
            let first = format!("{}01", &last[..8]);
            assert_eq!(next_month_start(day(&first)), day(next), "{first}");
        }
    }

    #[test]
    fn waits_run_to_the_next_midnight_and_the_next_month() {
        let evening = humantime::parse_rfc3339("2026-12-31T23:59:00Z").unwrap();
        assert_eq!(until_next_day(evening), Duration::from_secs(60));
        assert_eq!(until_next_month(evening), Duration::from_secs(60));
        let mid_month = humantime::parse_rfc3339("2026-02-27T00:00:00Z").unwrap();
        assert_eq!(
            until_next_month(mid_month),
            Duration::from_secs(2 * DAY_SECS)
        );
    }
}
