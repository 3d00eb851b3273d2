//! Request parameters: parsed strictly, with 400s that name the parameter.

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use meterline_domain::{Granularity, Kept, TimeColumn};
use meterline_http::ApiError;
use meterline_sql::{DIMENSIONS, Plan, Scope, i, plan, s};
use std::collections::HashMap;
const STRING_FILTERS: &[&str] = &["user_id", "customer_id", "feature", "model", "environment"];
const COMMON: &[&str] = &["from", "to", "user_id", "customer_id", "feature", "model", "environment", "billable"];

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_parameter", message).with_field(param)
}

/// Raw query parameters with the set a route accepts.
#[derive(Debug)]
pub struct Params<'a> {
    raw: &'a HashMap<String, String>,
}

impl<'a> Params<'a> {
    /// Refuses any parameter outside `COMMON` and `extra` (a typo must not be ignored).
    pub fn new(raw: &'a HashMap<String, String>, extra: &[&str]) -> Result<Params<'a>, ApiError> {
        if let Some(unknown) = raw.keys().find(|k| !COMMON.contains(&k.as_str()) && !extra.contains(&k.as_str())) {
            let mut accepted: Vec<&str> = COMMON.iter().chain(extra).copied().collect();
            accepted.sort();
            return Err(bad(unknown, format!("unknown parameter; accepted: {}", accepted.join(", "))));
        }
        Ok(Params { raw })
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.raw.get(name).map(String::as_str)
    }

    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.get(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| bad(name, "must be an RFC 3339 timestamp, e.g. 2026-11-01T00:00:00Z"))
            })
            .transpose()
    }

    pub fn choice(&self, name: &str, allowed: &[&'static str], default: &'static str) -> Result<&'static str, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => allowed.iter().copied().find(|a| *a == v).ok_or_else(|| bad(name, format!("must be one of {}", allowed.join(", ")))),
        }
    }

    /// One of `all` by its name (`name_of`), or `default` when absent.
    pub fn one_of<T: Copy>(&self, name: &str, all: &[T], name_of: fn(T) -> &'static str, default: T) -> Result<T, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => all.iter().copied().find(|t| name_of(*t) == v).ok_or_else(|| {
                bad(name, format!("must be one of {}", all.iter().map(|t| name_of(*t)).collect::<Vec<_>>().join(", ")))
            }),
        }
    }

    /// A comma-separated list of dimensions, each at most once.
    pub fn dimensions(&self, name: &str, default: &[&'static str]) -> Result<Vec<&'static str>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(default.to_vec()) };
        let mut out: Vec<&'static str> = Vec::new();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let d = DIMENSIONS.iter().copied().find(|d| *d == part).ok_or_else(|| bad(name, format!("{part:?} is not one of {}", DIMENSIONS.join(", "))))?;
            if !out.contains(&d) {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub fn limit(&self, default: i64, max: i64) -> Result<i64, ApiError> {
        match self.get("limit") {
            None => Ok(default),
            Some(v) => v.parse::<i64>().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| bad("limit", format!("must be an integer from 1 to {max}"))),
        }
    }

    /// The time range (`to` exclusive) and the filters, as a WHERE clause on
    /// `time_column` for `tenant`. A window belongs to the range if it starts in it.
    /// The stores compare whole seconds, so a bound with a fraction of a second
    /// is rounded up: `to` defaults to now, and an event posted this second
    /// (its minute window starting this second) is in that range.
    pub fn scope(&self, tenant: &str, time_column: TimeColumn, default_days: Option<i64>, max_days: i64) -> Result<Scope, ApiError> {
        let now = Utc::now();
        let to = ceil_second(self.time("to")?.unwrap_or(now));
        let from = match (self.time("from")?, default_days) {
            (Some(f), _) => ceil_second(f),
            (None, Some(days)) => to - Duration::days(days),
            (None, None) => Utc.with_ymd_and_hms(to.year(), to.month(), 1, 0, 0, 0).single().unwrap_or(to),
        };
        if from >= to {
            return Err(bad("from", "must be before to"));
        }
        if to - from > Duration::days(max_days) {
            return Err(bad("from", format!("the range may span at most {max_days} days")));
        }
        let mut filters = Vec::new();
        for f in STRING_FILTERS {
            if let Some(v) = self.get(f) {
                if v.is_empty() || v.len() > 256 {
                    return Err(bad(f, "must be 1 to 256 bytes"));
                }
                filters.push((*f, s(v)));
            }
        }
        if let Some(v) = self.get("billable") {
            let b = match v {
                "true" => 1,
                "false" => 0,
                _ => return Err(bad("billable", "must be true or false")),
            };
            filters.push(("billable", i(b)));
        }
        Ok(Scope { tenant: tenant.to_owned(), time_column, from, to, filters })
    }
}

/// `t` rounded up to a whole second.
fn ceil_second(t: DateTime<Utc>) -> DateTime<Utc> {
    if t.timestamp_subsec_nanos() == 0 { t } else { DateTime::from_timestamp(t.timestamp() + 1, 0).unwrap_or(t) }
}

/// The rollups a usage question reads, each with where its read starts, for
/// the retention check, as the shared `meterline_sql::plan` picks them:
/// whole days from the day rollups (per user or per dimension) and partial
/// edge days from the minute rollups, or only minutes. A store that reads
/// other rows says so in `QueryStore::rollup_reads`.
pub fn rollup_reads(scope: &Scope, granularity: Granularity, group_by: &[&str]) -> Vec<(Kept, i64)> {
    match plan(scope, granularity, group_by) {
        Plan::Days { day_from, day_to, .. } | Plan::DimDays { day_from, day_to, .. } => day_reads(scope, (day_from, day_to)),
        Plan::Minutes { from, .. } => vec![(Kept::RollupsMinute, from)],
    }
}

/// Whole days `[day_from, day_to)` from the day rollups, the range's partial
/// edge days from the minute rollups.
pub fn day_reads(scope: &Scope, (day_from, day_to): (i64, i64)) -> Vec<(Kept, i64)> {
    let mut reads = vec![(Kept::RollupsDaily, day_from)];
    if scope.from.timestamp() < day_from {
        reads.push((Kept::RollupsMinute, scope.from.timestamp()));
    }
    if scope.to.timestamp() > day_to {
        reads.push((Kept::RollupsMinute, day_to));
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn field(e: ApiError) -> String {
        e.field.unwrap_or_default()
    }

    #[test]
    fn unknown_parameters_are_refused_by_name() {
        let r = raw(&[("form", "2026-01-01T00:00:00Z")]);
        let e = Params::new(&r, &["limit"]).unwrap_err();
        assert_eq!(field(e.clone()), "form");
        assert!(e.message.contains("accepted:") && e.message.contains("limit"), "{}", e.message);
    }

    #[test]
    fn ranges_are_checked_and_filters_kept_in_order() {
        let r = raw(&[("from", "2026-01-02T00:00:00Z"), ("to", "2026-01-01T00:00:00Z")]);
        assert_eq!(field(Params::new(&r, &[]).unwrap().scope("t", TimeColumn::WindowStart, Some(30), 400).unwrap_err()), "from");
        let r = raw(&[("from", "2025-01-01T00:00:00Z"), ("to", "2026-03-01T00:00:00Z")]);
        let e = Params::new(&r, &[]).unwrap().scope("t", TimeColumn::WindowStart, Some(30), 400).unwrap_err();
        assert!(e.message.contains("400 days"), "{}", e.message);
        let r = raw(&[("to", "yesterday")]);
        assert_eq!(field(Params::new(&r, &[]).unwrap().scope("t", TimeColumn::WindowStart, Some(30), 400).unwrap_err()), "to");
        let r = raw(&[("billable", "true"), ("model", "m"), ("user_id", "u"), ("to", "2026-01-31T00:00:00Z")]);
        let scope = Params::new(&r, &[]).unwrap().scope("t", TimeColumn::EventTime, Some(30), 400).unwrap();
        assert_eq!(scope.filters, vec![("user_id", s("u")), ("model", s("m")), ("billable", i(1))]);
        assert_eq!((scope.to - scope.from).num_days(), 30);
        assert!(scope.one_user());
        let r = raw(&[("billable", "yes")]);
        assert_eq!(field(Params::new(&r, &[]).unwrap().scope("t", TimeColumn::WindowStart, Some(30), 400).unwrap_err()), "billable");
        let long = "x".repeat(257);
        let r = raw(&[("feature", long.as_str())]);
        assert_eq!(field(Params::new(&r, &[]).unwrap().scope("t", TimeColumn::WindowStart, Some(30), 400).unwrap_err()), "feature");
    }

    #[test]
    fn a_bound_with_a_fraction_keeps_the_window_of_its_second() {
        // The stores bind whole seconds: truncating `to` would drop a window
        // starting in the current second (the README's post-then-ask failed so in CI).
        let before = Utc::now();
        let r = raw(&[]);
        let scope = Params::new(&r, &[]).unwrap().scope("t", TimeColumn::WindowStart, Some(30), 400).unwrap();
        assert!(scope.to.timestamp() > before.timestamp() || before.timestamp_subsec_nanos() == 0, "{} vs {before}", scope.to);
        let r = raw(&[("from", "2026-11-28T20:40:00.5Z"), ("to", "2026-11-28T20:41:00.240Z")]);
        let scope = Params::new(&r, &[]).unwrap().scope("t", TimeColumn::WindowStart, Some(30), 400).unwrap();
        let at = |t: &str| DateTime::parse_from_rfc3339(t).unwrap().timestamp();
        assert_eq!((scope.from.timestamp(), scope.to.timestamp()), (at("2026-11-28T20:40:01Z"), at("2026-11-28T20:41:01Z")));
    }

    #[test]
    fn rollup_reads_name_what_each_plan_reads() {
        let at = |t: &str| DateTime::parse_from_rfc3339(t).map(|d| d.to_utc()).unwrap_or_default();
        let scope = |from, to, filters| Scope { tenant: "t".into(), time_column: TimeColumn::WindowStart, from: at(from), to: at(to), filters };
        let days = scope("2026-01-01T10:00:00Z", "2026-01-31T00:00:00Z", vec![]);
        let (edge, first_day) = (at("2026-01-01T10:00:00Z").timestamp(), at("2026-01-02T00:00:00Z").timestamp());
        assert_eq!(rollup_reads(&days, Granularity::Total, &["user_id"]), vec![(Kept::RollupsDaily, first_day), (Kept::RollupsMinute, edge)]);
        assert_eq!(rollup_reads(&days, Granularity::Total, &["model"]), vec![(Kept::RollupsDaily, first_day), (Kept::RollupsMinute, edge)]);
        assert_eq!(rollup_reads(&days, Granularity::Total, &["model", "user_id"]), vec![(Kept::RollupsMinute, edge)]);
        assert_eq!(rollup_reads(&days, Granularity::Hour, &[]), vec![(Kept::RollupsMinute, edge)]);
        // One user by feature: the shared plan has no daily rows with both.
        let one_user = scope("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z", vec![("user_id", s("u")), ("feature", s("f"))]);
        assert_eq!(rollup_reads(&one_user, Granularity::Day, &["model"]), vec![(Kept::RollupsMinute, at("2026-01-01T00:00:00Z").timestamp())]);
    }

    #[test]
    fn choices_limits_and_dimensions() {
        use meterline_domain::Granularity;
        let r = raw(&[("granularity", "week"), ("limit", "0"), ("group_by", "model, user_id,model")]);
        let p = Params::new(&r, &["granularity", "limit", "group_by"]).unwrap();
        let e = p.one_of("granularity", &Granularity::ALL, Granularity::as_str, Granularity::Day).unwrap_err();
        assert!(e.message.contains("minute, hour, day, month, total"), "{}", e.message);
        assert_eq!(field(p.limit(10, 100).unwrap_err()), "limit");
        assert_eq!(p.dimensions("group_by", &[]).unwrap(), vec!["model", "user_id"]);
        let r = raw(&[("group_by", "region")]);
        assert_eq!(field(Params::new(&r, &["group_by"]).unwrap().dimensions("group_by", &[]).unwrap_err()), "group_by");
        let none = raw(&[]);
        assert_eq!(Params::new(&none, &[]).unwrap().one_of("granularity", &Granularity::ALL, Granularity::as_str, Granularity::Day).unwrap(), Granularity::Day);
    }
}
