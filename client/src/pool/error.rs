//! Errors of the pool, and the typed quota error read from the extension's SQLSTATE 53400.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration or a URL in it is unusable.
    #[error(transparent)]
    Config(#[from] super::ConfigError),
    /// No connection could be had from a node (down, or its pool exhausted past the wait timeout).
    #[error("no connection to {node}: {source}")]
    Checkout { node: String, source: PoolError },
    /// A statement failed on a node.
    #[error("{node}: {}", describe(.source))]
    Database { node: String, source: tokio_postgres::Error },
    /// An insert went over the company's plan limit.
    #[error(transparent)]
    Quota(Box<QuotaExceeded>),
    /// The connection could not be attributed to its company; it has been discarded.
    #[error("{node}: could not set tenant_scale.company to {company:?}: {source}")]
    Attribution { node: String, company: String, source: tokio_postgres::Error },
    /// A company name the setting `tenant_scale.company` cannot hold.
    #[error("company name {company:?} cannot be attributed: {reason}")]
    InvalidCompany { company: String, reason: &'static str },
    /// `close()` was called.
    #[error("the pool is closed")]
    Closed,
    /// `close()` gave up waiting for checked-out connections.
    #[error("{in_use} connection(s) still checked out when the close deadline passed")]
    CloseTimeout { in_use: usize },
}

impl Error {
    /// The quota error, when this is one.
    pub fn quota(&self) -> Option<&QuotaExceeded> {
        match self {
            Error::Quota(quota) => Some(quota),
            _ => None,
        }
    }
}

/// The extension refused a row because the company is at its plan's limit (SQLSTATE 53400).
///
/// The fields are read from the error's MESSAGE (company, resource, plan, limit), DETAIL (used,
/// requested) and HINT (the upgrade plan and its limit); the three texts are kept as PostgreSQL sent
/// them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct QuotaExceeded {
    pub company: String,
    pub resource: String,
    pub plan: String,
    pub limit: Option<i64>,
    pub used: Option<i64>,
    pub requested: Option<i64>,
    /// The cheapest higher plan that allows more rows, if any.
    pub upgrade_plan: Option<String>,
    /// That plan's limit; `None` with an upgrade plan means unlimited.
    pub upgrade_limit: Option<i64>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl QuotaExceeded {
    /// Reads a quota error out of any tokio-postgres error (also one from a `Transaction`).
    pub fn from_error(error: &tokio_postgres::Error) -> Option<QuotaExceeded> {
        let db = error.as_db_error()?;
        if db.code() != &SqlState::CONFIGURATION_LIMIT_EXCEEDED {
            return None;
        }
        Some(Self::parse(db.message(), db.detail(), db.hint()))
    }

    /// The extension's texts (src/quota/refusal.rs):
    /// MESSAGE `company "C" has reached its limit of N RESOURCE on plan "P"`,
    /// DETAIL `USED of N RESOURCE are in use[, ...]; this statement needs REQUESTED more.`,
    /// HINT `Upgrade to plan "Q", which allows M RESOURCE, or delete rows.` (`unlimited` for no limit),
    /// or `No plan allows more RESOURCE: delete rows to make room.`
    fn parse(message: &str, detail: Option<&str>, hint: Option<&str>) -> QuotaExceeded {
        let names = quoted(message);
        let (limit, resource) = message
            .split_once("limit of ")
            .and_then(|(_, rest)| {
                let (limit, rest) = rest.split_once(' ')?;
                let (resource, _) = rest.rsplit_once(" on plan ")?;
                Some((limit.parse().ok(), resource.to_string()))
            })
            .unwrap_or_default();
        let detail_numbers = detail.map(numbers).unwrap_or_default();
        let upgrade_plan = hint.and_then(|hint| quoted(hint).into_iter().next());
        let upgrade_limit = upgrade_plan.as_ref().and(hint).and_then(|hint| numbers(hint).first().copied());
        QuotaExceeded {
            company: names.first().cloned().unwrap_or_default(),
            resource,
            plan: if names.len() > 1 { names.last().cloned().unwrap_or_default() } else { String::new() },
            limit,
            used: detail_numbers.first().copied(),
            requested: (detail_numbers.len() > 1).then(|| detail_numbers.last().copied()).flatten(),
            upgrade_limit,
            upgrade_plan,
            message: message.to_string(),
            detail: detail.map(str::to_string),
            hint: hint.map(str::to_string),
        }
    }
}

/// A server error's own words and SQLSTATE ("db error" is all tokio-postgres's Display says).
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Strings between double quotes (PostgreSQL's way of quoting names in messages).
fn quoted(text: &str) -> Vec<String> {
    text.split('"').skip(1).step_by(2).map(str::to_string).collect()
}

/// Integers outside quoted names, with thousands separators removed.
fn numbers(text: &str) -> Vec<i64> {
    text.split('"')
        .step_by(2)
        .flat_map(|unquoted| unquoted.split(|c: char| !(c.is_ascii_digit() || c == ',')))
        .filter_map(|token| token.replace(',', "").parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_fields_are_read_from_the_extensions_message_detail_and_hint() {
        let quota = QuotaExceeded::parse(
            r#"company "acme 2" has reached its limit of 1000 patients on plan "free""#,
            Some("1000 of 1000 patients are in use, 2 of them taken by this statement, which needs 1 more."),
            Some(r#"Upgrade to plan "basic", which allows 5000 patients, or delete rows."#),
        );
        assert_eq!(
            (quota.company.as_str(), quota.resource.as_str(), quota.plan.as_str(), quota.limit),
            ("acme 2", "patients", "free", Some(1000))
        );
        assert_eq!((quota.used, quota.requested), (Some(1000), Some(1)));
        assert_eq!((quota.upgrade_plan.as_deref(), quota.upgrade_limit), (Some("basic"), Some(5000)));
    }

    #[test]
    fn unlimited_upgrade_and_no_upgrade_are_told_apart() {
        let unlimited = QuotaExceeded::parse(
            r#"company "c" has reached its limit of 9 order lines on plan "professional""#,
            Some("9 of 9 order lines are in use; this statement needs 3 more."),
            Some(r#"Upgrade to plan "enterprise", which allows unlimited order lines, or delete rows."#),
        );
        assert_eq!(
            (unlimited.resource.as_str(), unlimited.used, unlimited.requested),
            ("order lines", Some(9), Some(3))
        );
        assert_eq!((unlimited.upgrade_plan.as_deref(), unlimited.upgrade_limit), (Some("enterprise"), None));
        let none = QuotaExceeded::parse(
            r#"company "c" has reached its limit of 9 orders on plan "enterprise""#,
            None,
            Some("No plan allows more orders: delete rows to make room."),
        );
        assert_eq!((none.upgrade_plan, none.upgrade_limit, none.used), (None, None, None));
    }
}
