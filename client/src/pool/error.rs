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
/// them. A field is `None` when its text does not have the extension's shape (another server version,
/// or PostgreSQL's own 53400 errors): nothing is guessed, so a company read here is always the one the
/// server named, never the connection's or a quoted word from some other text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct QuotaExceeded {
    pub company: Option<String>,
    pub resource: Option<String>,
    pub plan: Option<String>,
    pub limit: Option<i64>,
    pub used: Option<i64>,
    pub requested: Option<i64>,
    /// The cheapest higher plan that allows more rows; `None` when no plan does or the hint could not
    /// be read.
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

    /// The extension's texts (src/quota/refusal.rs), where names are interpolated between double
    /// quotes without escaping (a company name may itself hold quotes):
    /// MESSAGE `company "C" has reached its limit of N RESOURCE on plan "P"`,
    /// DETAIL `USED of N RESOURCE are in use[, ...]; this statement needs REQUESTED more.`,
    /// HINT `Upgrade to plan "Q", which allows M RESOURCE, or delete rows.` (`unlimited` for no limit),
    /// or `No plan allows more RESOURCE: delete rows to make room.`
    fn parse(message: &str, detail: Option<&str>, hint: Option<&str>) -> QuotaExceeded {
        let refusal = parse_message(message);
        let (upgrade_plan, upgrade_limit) = hint.and_then(parse_upgrade).unzip();
        QuotaExceeded {
            company: refusal.as_ref().map(|refusal| refusal.company.to_string()),
            resource: refusal.as_ref().map(|refusal| refusal.resource.to_string()),
            plan: refusal.as_ref().map(|refusal| refusal.plan.to_string()),
            limit: refusal.as_ref().map(|refusal| refusal.limit),
            used: detail.and_then(|detail| detail.split_once(" of ")?.0.parse().ok()),
            requested: detail
                .and_then(|detail| detail.strip_suffix(" more.")?.rsplit_once(" needs ")?.1.parse().ok()),
            upgrade_plan,
            upgrade_limit: upgrade_limit.flatten(),
            message: message.to_string(),
            detail: detail.map(str::to_string),
            hint: hint.map(str::to_string),
        }
    }
}

/// The parts of the extension's MESSAGE.
struct Refusal<'a> {
    company: &'a str,
    limit: i64,
    resource: &'a str,
    plan: &'a str,
}

/// Reads MESSAGE from both ends, so quotes inside the company name do not matter; `None` unless the
/// text has exactly the extension's shape.
fn parse_message(message: &str) -> Option<Refusal<'_>> {
    let inner = message.strip_prefix("company \"")?.strip_suffix('"')?;
    let (rest, plan) = split_at_only(inner, " on plan \"")?;
    let (company, limit_and_resource) = split_at_only(rest, "\" has reached its limit of ")?;
    let (limit, resource) = limit_and_resource.split_once(' ')?;
    Some(Refusal { company, limit: limit.parse().ok()?, resource, plan })
}

/// The upgrade plan and its limit (`None` for unlimited) from HINT; `None` for any other text.
fn parse_upgrade(hint: &str) -> Option<(String, Option<i64>)> {
    let rest = hint.strip_prefix("Upgrade to plan \"")?;
    let (plan, allows) = split_at_only(rest, "\", which allows ")?;
    let limit = match allows.split_once(' ')?.0 {
        "unlimited" => None,
        // A number that does not read must not pass for "unlimited".
        number => Some(number.parse().ok()?),
    };
    Some((plan.to_string(), limit))
}

/// Splits `text` at `separator` when it occurs exactly once: a second one (inside a name) would make
/// any split a guess.
fn split_at_only<'a>(text: &'a str, separator: &str) -> Option<(&'a str, &'a str)> {
    let (before, after) = text.split_once(separator)?;
    (!after.contains(separator)).then_some((before, after))
}

/// A server error's own words and SQLSTATE ("db error" is all tokio-postgres's Display says).
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
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
            (quota.company.as_deref(), quota.resource.as_deref(), quota.plan.as_deref(), quota.limit),
            (Some("acme 2"), Some("patients"), Some("free"), Some(1000))
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
            (unlimited.resource.as_deref(), unlimited.used, unlimited.requested),
            (Some("order lines"), Some(9), Some(3))
        );
        assert_eq!((unlimited.upgrade_plan.as_deref(), unlimited.upgrade_limit), (Some("enterprise"), None));
        let none = QuotaExceeded::parse(
            r#"company "c" has reached its limit of 9 orders on plan "enterprise""#,
            None,
            Some("No plan allows more orders: delete rows to make room."),
        );
        assert_eq!((none.upgrade_plan, none.upgrade_limit, none.used), (None, None, None));
    }

    #[test]
    fn quotes_and_digits_inside_names_do_not_shift_the_fields() {
        let quota = QuotaExceeded::parse(
            r#"company "say "hi" 42" has reached its limit of 7 items2 on plan "free""#,
            Some("7 of 7 items2 are in use; this statement needs 2 more."),
            Some(r#"Upgrade to plan "basic", which allows 70 items2, or delete rows."#),
        );
        assert_eq!(quota.company.as_deref(), Some(r#"say "hi" 42"#));
        assert_eq!((quota.resource.as_deref(), quota.limit), (Some("items2"), Some(7)));
        assert_eq!((quota.used, quota.requested, quota.upgrade_limit), (Some(7), Some(2), Some(70)));
    }

    #[test]
    fn texts_of_another_shape_give_no_field_rather_than_a_guess() {
        let odd = [
            "",
            "\"",
            r#"could not extend "patients": quota of "acme" exceeded"#,
            r#"company "acme" has reached its limit of many patients on plan "free""#,
            r#"company "acme" has reached its limit of 99999999999999999999 patients on plan "free""#,
            r#"company "a" on plan "b" has reached its limit of 1 rows on plan "free""#,
            r#"company "acme" has reached its limit of 5 patients on plan "free"#,
            "company \"\u{fffd}\0\" has reached its limit of",
        ];
        for message in odd {
            let quota = QuotaExceeded::parse(message, Some("some of them"), Some(r#"Upgrade to plan "x""#));
            assert_eq!(
                (quota.company, quota.resource, quota.plan, quota.limit),
                (None, None, None, None),
                "{message:?}"
            );
            assert_eq!((quota.used, quota.requested, quota.upgrade_plan), (None, None, None), "{message:?}");
            assert_eq!(quota.message, message, "the server's words are kept");
        }
        let unreadable_limit = QuotaExceeded::parse(
            "",
            None,
            Some(r#"Upgrade to plan "basic", which allows lots of patients, or delete rows."#),
        );
        assert_eq!(
            (unreadable_limit.upgrade_plan, unreadable_limit.upgrade_limit),
            (None, None),
            "a limit that does not read is not taken for unlimited"
        );
    }
}
