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
    #[error("{node}: {source}")]
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
        if db.code() != &SqlState::PROGRAM_LIMIT_EXCEEDED {
            return None;
        }
        Some(Self::parse(db.message(), db.detail(), db.hint()))
    }

    /// Quoted names in MESSAGE are company, resource and plan, in that order, and its last number is the
    /// limit; DETAIL's numbers are used then requested; HINT's quoted name is the upgrade plan and its
    /// number that plan's limit.
    fn parse(message: &str, detail: Option<&str>, hint: Option<&str>) -> QuotaExceeded {
        let names = quoted(message);
        let name = |index: usize| names.get(index).cloned().unwrap_or_default();
        let detail_numbers = detail.map(numbers).unwrap_or_default();
        let upgrade_plan = hint.and_then(|hint| quoted(hint).into_iter().next());
        QuotaExceeded {
            company: name(0),
            resource: name(1),
            plan: name(2),
            limit: numbers(message).last().copied(),
            used: detail_numbers.first().copied(),
            requested: detail_numbers.get(1).copied(),
            upgrade_limit: upgrade_plan.as_ref().and(hint).and_then(|hint| numbers(hint).last().copied()),
            upgrade_plan,
            message: message.to_string(),
            detail: detail.map(str::to_string),
            hint: hint.map(str::to_string),
        }
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
    fn quota_fields_are_read_from_message_detail_and_hint() {
        let quota = QuotaExceeded::parse(
            r#"company "acme 2" is at its limit of "patients": plan "free" allows 1,000 rows"#,
            Some("1000 rows used, 1 requested."),
            Some(r#"Upgrade to plan "basic" (5000 rows)."#),
        );
        assert_eq!(
            (quota.company.as_str(), quota.resource.as_str(), quota.plan.as_str(), quota.limit),
            ("acme 2", "patients", "free", Some(1000))
        );
        assert_eq!((quota.used, quota.requested), (Some(1000), Some(1)));
        assert_eq!((quota.upgrade_plan.as_deref(), quota.upgrade_limit), (Some("basic"), Some(5000)));
    }

    #[test]
    fn hint_without_a_plan_means_no_upgrade() {
        let quota = QuotaExceeded::parse(
            r#"company "c" is at its limit of "orders": plan "enterprise" allows 9 rows"#,
            None,
            Some("Delete rows to make room."),
        );
        assert_eq!((quota.upgrade_plan, quota.upgrade_limit), (None, None));
        assert_eq!((quota.used, quota.requested), (None, None));
    }
}
