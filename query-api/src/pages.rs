//! Paging list answers (`/v1/usage`, `/v1/alerts`): the opaque `cursor` a
//! page hands back, and the part of the range a next page still has to read.
//!
//! A cursor is the last row's keys, hex-encoded like the audit trail's:
//! `granularity:group_by:bucket:user:customer:feature:model`, each string key
//! hex-encoded inside so that a `:` in a user id cannot shift the fields. It
//! names the granularity and grouping it was cut from, so a cursor passed
//! with other ones is refused rather than resuming at a meaningless place.

use meterline_domain::{AlertRow, Granularity, SumRow};
use meterline_http::ApiError;
use meterline_sql::{AlertCursor, GroupCursor, Scope};

/// The cursor resuming after `row`, for an answer of `granularity` and `group_by`.
pub fn encode(granularity: Granularity, group_by: &[&str], row: &SumRow) -> String {
    let keys = [&row.g_user, &row.g_customer, &row.g_feature, &row.g_model].map(hex::encode).join(":");
    hex::encode(format!("{}:{}:{}:{keys}", granularity.as_str(), group_by.join(","), row.g_bucket))
}

/// The keys a `cursor` resumes after; a 400 naming `cursor` if this API did
/// not hand it out for the same granularity and grouping.
pub fn decode(text: &str, granularity: Granularity, group_by: &[&str]) -> Result<GroupCursor, ApiError> {
    let bad = |message: &str| ApiError::bad_request("invalid_parameter", message).with_field("cursor");
    let not_ours = || bad("not a cursor this API returned");
    let text = hex::decode(text).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(not_ours)?;
    let parts: Vec<&str> = text.split(':').collect();
    let [g, groups, bucket, user, customer, feature, model] = parts[..] else { return Err(not_ours()) };
    if g != granularity.as_str() || groups != group_by.join(",") {
        return Err(bad("the cursor belongs to another granularity or group_by; pass the same ones as for the first page"));
    }
    let key = |hexed: &str| hex::decode(hexed).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(not_ours);
    Ok(GroupCursor {
        bucket: bucket.parse().map_err(|_| not_ours())?,
        user: key(user)?,
        customer: key(customer)?,
        feature: key(feature)?,
        model: key(model)?,
    })
}

/// The scope a page after `after` reads: no window before the cursor's
/// bucket can hold a later group, so those are not summed again (a deep page
/// of minute rows would otherwise re-read the whole range). Totals have one
/// bucket: nothing to skip.
pub fn rest(scope: &Scope, granularity: Granularity, after: &GroupCursor) -> Scope {
    let from = scope.from.timestamp();
    if granularity == Granularity::Total || after.bucket <= from {
        return scope.clone();
    }
    scope.with_range(after.bucket.min(scope.to.timestamp()), scope.to.timestamp())
}

/// The cursor resuming a list of alerts after `a`.
pub fn encode_alert(a: &AlertRow) -> String {
    hex::encode(format!("{}:{}:{}", a.opened_at, hex::encode(&a.user_id), hex::encode(&a.rule)))
}

/// The alert a `cursor` resumes after; a 400 naming `cursor` if this API did not hand it out.
pub fn decode_alert(text: &str) -> Result<AlertCursor, ApiError> {
    let not_ours = || ApiError::bad_request("invalid_parameter", "not a cursor this API returned").with_field("cursor");
    let text = hex::decode(text).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(not_ours)?;
    let parts: Vec<&str> = text.split(':').collect();
    let [opened_at, user, rule] = parts[..] else { return Err(not_ours()) };
    let key = |hexed: &str| hex::decode(hexed).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(not_ours);
    Ok((opened_at.parse().map_err(|_| not_ours())?, key(user)?, key(rule)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use meterline_domain::TimeColumn;

    #[test]
    fn cursors_round_trip_keys_with_separators() {
        let row = SumRow { g_bucket: 86_400, g_user: "a:b".into(), g_model: "m".into(), ..SumRow::default() };
        let c = encode(Granularity::Day, &["user_id", "model"], &row);
        let after = decode(&c, Granularity::Day, &["user_id", "model"]).unwrap();
        assert_eq!(after, GroupCursor { bucket: 86_400, user: "a:b".into(), customer: String::new(), feature: String::new(), model: "m".into() });
        for (g, by) in [(Granularity::Hour, &["user_id", "model"][..]), (Granularity::Day, &["model", "user_id"][..])] {
            assert!(decode(&c, g, by).unwrap_err().message.contains("another granularity"));
        }
        for junk in ["zz", "", &hex::encode("day:user_id:x:00:00:00:00"), &hex::encode("day:user_id:1:00")] {
            assert_eq!(decode(junk, Granularity::Day, &["user_id"]).unwrap_err().field.as_deref(), Some("cursor"), "{junk}");
        }
    }

    #[test]
    fn alert_cursors_round_trip() {
        let a = AlertRow {
            tenant: "t".into(),
            user_id: "u:1".into(),
            rule: "peers".into(),
            opened_at: 1_800_000_000,
            state: "open".into(),
            observed_nanos: 2,
            threshold_nanos: 1,
            window_secs: 60,
            updated_at: 1_800_000_000,
            resolved_at: 0,
            version: 1,
        };
        assert_eq!(decode_alert(&encode_alert(&a)).unwrap(), (1_800_000_000, "u:1".to_owned(), "peers".to_owned()));
        assert_eq!(decode_alert("0").unwrap_err().field.as_deref(), Some("cursor"));
    }

    #[test]
    fn later_pages_skip_windows_before_the_cursor_bucket() {
        let scope = Scope {
            tenant: "t".into(),
            time_column: TimeColumn::WindowStart,
            from: DateTime::from_timestamp(1_000, 0).unwrap(),
            to: DateTime::from_timestamp(500_000, 0).unwrap(),
            filters: vec![],
        };
        let at = |bucket| GroupCursor { bucket, ..GroupCursor::default() };
        assert_eq!(rest(&scope, Granularity::Day, &at(86_400)).from.timestamp(), 86_400);
        assert_eq!(rest(&scope, Granularity::Day, &at(0)).from.timestamp(), 1_000, "the first bucket starts before the range");
        assert_eq!(rest(&scope, Granularity::Total, &at(86_400)).from.timestamp(), 1_000);
        assert_eq!(rest(&scope, Granularity::Day, &at(900_000)).from.timestamp(), 500_000);
    }
}
