//! The error a refused row raises: SQLSTATE 53400 (configuration_limit_exceeded), with the numbers in
//! DETAIL and the way out in HINT, so that an application can show it as it is.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::config::{Config, Limit, QuotaDef};

pub(super) fn raise_quota_exceeded(
    config: &Config,
    company: &str,
    def: &QuotaDef,
    limit: Limit,
    used: i64,
    reserved_by_statement: i64,
    requested: i64,
) -> ! {
    let resource = &def.resource;
    let max_rows = limit.max_rows.unwrap_or(i64::MAX);
    let hint = match config.upgrade(def, limit) {
        Some((plan, Some(rows))) => {
            format!("Upgrade to plan \"{plan}\", which allows {rows} {resource}, or delete rows.")
        }
        Some((plan, None)) => {
            format!("Upgrade to plan \"{plan}\", which allows unlimited {resource}, or delete rows.")
        }
        None => format!("No plan allows more {resource}: delete rows to make room."),
    };
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
        format!(
            "company \"{company}\" has reached its limit of {max_rows} {resource} on plan \"{}\"",
            config.plan_name(limit.plan)
        ),
        function_name!(),
    )
    .set_detail(if reserved_by_statement == 0 {
        format!("{used} of {max_rows} {resource} are in use; this statement needs {requested} more.")
    } else {
        format!(
            "{used} of {max_rows} {resource} are in use, {reserved_by_statement} of them taken by this statement, \
             which needs {requested} more."
        )
    })
    .set_hint(hint)
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}
