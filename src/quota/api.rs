//! The SQL functions of the quota capability (plpgsql ones are in sql/quota.sql).
//!
//! Administrative functions (enforce_quota, drop_quota, reconcile) are not executable by PUBLIC, and
//! on top of that require the caller to hold the TRIGGER privilege on the table, as creating the
//! triggers by hand would; their internal SQL then runs as the extension owner (elevated.rs).
//! quota_status and quota_check are for applications and executable by anyone.

use std::collections::HashMap;
use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{AnyNumeric, PgRelation};

use super::company::CounterKey;
use super::config::{self, Config, QuotaDef};
use super::count::{Seeing, count_rows};
use super::counters;
use super::ledger;
use super::slow;
use super::trigger::{ROW_TRIGGER, TRUNCATE_TRIGGER};
use crate::elevated::{OrRaise, as_extension_owner, qualified_relation_name, quote_identifier};

fn invalid_argument(message: String, hint: Option<String>) -> ! {
    let mut report =
        ErrorReport::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, function_name!());
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!()
}

fn required<T>(value: Option<T>, argument: &str) -> T {
    value.unwrap_or_else(|| invalid_argument(format!("{argument} must not be NULL"), None))
}

fn required_text<'a>(value: Option<&'a str>, argument: &str) -> &'a str {
    match required(value, argument) {
        "" => invalid_argument(format!("{argument} must not be empty"), None),
        text => text,
    }
}

fn display_name(relation: &PgRelation) -> String {
    qualified_relation_name(relation.oid()).unwrap_or_else(|| relation.oid().to_string())
}

/// The caller may manage quotas on a table it could put triggers on by hand.
fn require_trigger_privilege(relation: &PgRelation, action: &str) {
    // SAFETY: a catalog privilege check for the current user on an open relation.
    let allowed = unsafe {
        pg_sys::pg_class_aclcheck(relation.oid(), pg_sys::GetUserId(), pg_sys::ACL_TRIGGER as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
    };
    if !allowed {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to {action} on table {}", display_name(relation)),
            function_name!(),
        )
        .set_hint("Quotas are managed by roles with the TRIGGER privilege on the table, such as its owner.")
        .report(PgLogLevel::ERROR);
    }
}

fn require_no_changes_in_transaction(def: &QuotaDef, action: &str) {
    if ledger::holds_changes(def.quota_id) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            format!("cannot {action} {} in a transaction that changed its rows", def.relation),
            function_name!(),
        )
        .set_hint("Run it in a transaction of its own.")
        .report(PgLogLevel::ERROR);
    }
}

fn lock(relation: &PgRelation, mode: u32) {
    // SAFETY: a heavyweight lock on an existing relation, held until the transaction ends.
    unsafe { pg_sys::LockRelationOid(relation.oid(), mode as pg_sys::LOCKMODE) };
}

fn quota_of(config: &Config, relation: &PgRelation) -> std::rc::Rc<QuotaDef> {
    config.quota(relation.oid()).cloned().unwrap_or_else(|| {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("table {} has no quota", display_name(relation)),
            function_name!(),
        )
        .set_hint("tenant_scale.quotas lists the tables under quota.")
        .report(PgLogLevel::ERROR);
        unreachable!()
    })
}

/// Puts `relation` under the quota of `resource`: from now on, each company (the value of
/// `company_column`, compared as text) may hold at most as many rows as its plan allows. The rows
/// already there are the starting usage. Requires an index whose first column is the company column.
#[pg_extern(
    volatile,
    sql = r#"
CREATE FUNCTION tenant_scale."enforce_quota"("relation" regclass, "resource" text, "company_column" name)
RETURNS void VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'enforce_quota_wrapper';
COMMENT ON FUNCTION tenant_scale.enforce_quota(regclass, text, name) IS
    'Limits the rows of each company in a table to what its plan allows for the resource.';
"#
)]
fn enforce_quota(relation: Option<PgRelation>, resource: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) {
    let relation = required(relation, "relation");
    let resource = required_text(resource, "resource");
    // pgrx has no Rust type for `name`: the third argument is read as the NameData it is.
    // SAFETY: the SQL declaration above gives the function three arguments, the third of type name.
    let column = unsafe {
        if pgrx::fcinfo::pg_arg_is_null(fcinfo, 2) {
            invalid_argument("company_column must not be NULL".into(), None);
        }
        let name = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 2).cast_mut_ptr::<pg_sys::NameData>();
        std::ffi::CStr::from_ptr((*name).data.as_ptr()).to_string_lossy().into_owned()
    };
    if column.is_empty() {
        invalid_argument("company_column must not be empty".into(), None);
    }
    let name = display_name(&relation);
    // SAFETY: the pg_class row of an open relation.
    match unsafe { (*relation.rd_rel).relkind } as u8 {
        pg_sys::RELKIND_RELATION => {}
        pg_sys::RELKIND_PARTITIONED_TABLE => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("cannot enforce a quota on partitioned table {name}"),
                function_name!(),
            )
            .set_hint("Row quotas apply to plain tables.")
            .report(PgLogLevel::ERROR);
        }
        _ => invalid_argument(format!("relation {name} is not a table"), None),
    }
    require_trigger_privilege(&relation, "enforce a quota");
    let c_column = CString::new(column.clone()).expect("a name has no NUL");
    // SAFETY: catalog lookup of an attribute of an open relation.
    let attnum = unsafe { pg_sys::get_attnum(relation.oid(), c_column.as_ptr()) };
    if attnum <= 0 {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("company_column \"{column}\" is not a column of table {name}"),
            function_name!(),
        )
        .report(PgLogLevel::ERROR);
    }
    let attribute =
        relation.tuple_desc().get(attnum as usize - 1).copied().expect("attnum within the descriptor");
    if attribute.attgenerated != 0 {
        invalid_argument(
            format!("company_column \"{column}\" is a generated column"),
            Some("Generated values are computed after BEFORE triggers run, too late to be counted.".into()),
        );
    }

    let config = config::current();
    if let Some(existing) = config.quota(relation.oid()) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("table {name} is already under the quota of resource \"{}\"", existing.resource),
            function_name!(),
        )
        .set_hint(format!("Call tenant_scale.drop_quota('{name}') first to change it."))
        .report(PgLogLevel::ERROR);
    }
    if let Some(other) = config.quotas().find(|def| def.resource == resource) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("resource \"{resource}\" is already enforced on table {}", other.relation),
            function_name!(),
        )
        .set_hint("Each resource is counted in one table; choose another resource name.")
        .report(PgLogLevel::ERROR);
    }

    // Writers wait, and in-flight writers finish, before the rows are taken as the starting usage.
    lock(&relation, pg_sys::ShareRowExclusiveLock);
    let has_index = as_extension_owner(config.owner, || {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i
                            JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid
                            JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) c.relam
                            WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND i.indkey[0] OPERATOR(pg_catalog.=) $2
                              AND i.indisvalid AND i.indpred IS NULL AND am.amname OPERATOR(pg_catalog.=) 'btree')",
            &[relation.oid().into(), attnum.into()],
        )
    });
    if has_index != Ok(Some(true)) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {name} has no index whose first column is \"{column}\""),
            function_name!(),
        )
        .set_detail("Counting a company's rows must read its index entries, not the whole table.")
        .set_hint(format!("CREATE INDEX ON {name} ({});", quote_identifier(&column)))
        .report(PgLogLevel::ERROR);
    }

    // One row trigger for the three events: PostgreSQL copies every trigger of the table for each
    // statement, so fewer triggers cost less (an UPDATE that keeps the company is skipped inside).
    let statements = [
        format!(
            "CREATE TRIGGER {ROW_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE ON {name} \
             FOR EACH ROW EXECUTE FUNCTION tenant_scale.quota_trigger()"
        ),
        format!(
            "CREATE TRIGGER {TRUNCATE_TRIGGER} AFTER TRUNCATE ON {name} \
             FOR EACH STATEMENT EXECUTE FUNCTION tenant_scale.quota_trigger()"
        ),
    ];
    as_extension_owner(config.owner, || {
        Spi::run_with_args(
            "INSERT INTO tenant_scale.quotas (relation, resource, company_column) VALUES ($1, $2, $3::pg_catalog.name)",
            &[relation.oid().into(), resource.into(), column.as_str().into()],
        )
        .or_raise("recording the quota");
        for statement in &statements {
            Spi::run(statement).or_raise("creating the quota triggers");
        }
    });
    if counters::shared().is_none() {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("quota on {name} runs without shared memory: each company's writers wait for each other"),
            function_name!(),
        )
        .set_detail("tenant_scale is not in shared_preload_libraries, so counts are kept in locked rows of tenant_scale.quota_usage: exact, but slower under concurrency.")
        .set_hint("Add tenant_scale to shared_preload_libraries, keeping any libraries already listed there, and restart the server.")
        .report(PgLogLevel::NOTICE);
    }
}

/// Takes `relation` out of quota enforcement: its triggers and counters are removed; its rows stay.
#[pg_extern(volatile)]
fn drop_quota(relation: Option<PgRelation>) {
    let relation = required(relation, "relation");
    require_trigger_privilege(&relation, "drop a quota");
    let config = config::current();
    let def = quota_of(&config, &relation);
    require_no_changes_in_transaction(&def, "drop the quota on");
    lock(&relation, pg_sys::ShareRowExclusiveLock);
    as_extension_owner(config.owner, || {
        for trigger in [ROW_TRIGGER, TRUNCATE_TRIGGER] {
            Spi::run(&format!("DROP TRIGGER IF EXISTS {trigger} ON {}", def.relation))
                .or_raise("dropping the quota triggers");
        }
        Spi::run_with_args(
            "DELETE FROM tenant_scale.quotas WHERE relation OPERATOR(pg_catalog.=) $1",
            &[relation.oid().into()],
        )
        .or_raise("removing the quota");
    });
    // No writer can hold these counters while the lock is ours; if this transaction rolls back they
    // are simply rebuilt from the table.
    match counters::shared() {
        // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
        Some(shared) => shared.forget_quota(unsafe { pg_sys::MyDatabaseId }, def.quota_id),
        None => slow::forget_quota(&config, def.quota_id),
    }
}

/// Usage of one company: committed rows, plus this transaction's own changes when it made any.
fn rows_used(config: &Config, def: &QuotaDef, company: &str) -> i64 {
    let counted = |seeing| {
        def.company_datum(company).map_or(0, |datum| count_rows(config, def, datum, company, seeing))
    };
    if ledger::holds_changes(def.quota_id) {
        return counted(Seeing::Ours);
    }
    let cached = match counters::shared() {
        // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
        Some(shared) => shared
            .peek(&CounterKey::new(unsafe { pg_sys::MyDatabaseId }, def.quota_id, company.as_bytes()))
            .map(|(committed, _)| committed),
        None => slow::peek_committed_count(config, def.quota_id, company),
    };
    cached.unwrap_or_else(|| counted(Seeing::Committed))
}

/// Rows reserved right now by transactions in flight (they count against the limit).
fn rows_in_flight(def: &QuotaDef, company: &str) -> i64 {
    counters::shared()
        // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
        .and_then(|shared| {
            shared.peek(&CounterKey::new(unsafe { pg_sys::MyDatabaseId }, def.quota_id, company.as_bytes()))
        })
        .map_or(0, |(_, reserved)| reserved)
}

/// One row per resource under quota: what `company_id` uses, what its plan allows, and the cheapest
/// upgrade that allows more.
// pgrx reads the column names from the signature itself, so the row type cannot be an alias.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn quota_status(
    company_id: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(resource, String),
        name!(used, i64),
        name!(max_rows, Option<i64>),
        name!(remaining, Option<i64>),
        name!(percent_used, Option<AnyNumeric>),
        name!(plan, String),
        name!(upgrade_plan, Option<String>),
        name!(upgrade_max_rows, Option<i64>),
    ),
> {
    let company = required_text(company_id, "company_id");
    let config = config::current();
    let rows: Vec<_> = config
        .quotas()
        .map(|def| {
            let used = rows_used(&config, def, company);
            let limit = config.limit(company, def);
            let remaining = limit.max_rows.map(|max_rows| (max_rows - used).max(0));
            let percent_used = limit.max_rows.map(|max_rows| {
                let percent = if max_rows == 0 { 100.0 } else { used as f64 * 100.0 / max_rows as f64 };
                format!("{percent:.1}").parse::<AnyNumeric>().expect("a formatted number parses")
            });
            let (upgrade_plan, upgrade_max_rows) = match config.upgrade(def, limit) {
                Some((plan, max_rows)) => (Some(plan.to_string()), max_rows),
                None => (None, None),
            };
            (
                def.resource.clone(),
                used,
                limit.max_rows,
                remaining,
                percent_used,
                config.plan_name(limit.plan).to_string(),
                upgrade_plan,
                upgrade_max_rows,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Whether `company_id` could add `n` rows of `resource` now (rows other transactions have reserved
/// but not committed count as used).
#[pg_extern(volatile)]
fn quota_check(company_id: Option<&str>, resource: Option<&str>, n: default!(Option<i64>, 1)) -> bool {
    let company = required_text(company_id, "company_id");
    let resource = required_text(resource, "resource");
    let n = required(n, "n");
    if n < 0 {
        invalid_argument(format!("n must not be negative (got {n})"), None);
    }
    let config = config::current();
    let Some(def) = config.quotas().find(|def| def.resource == resource).cloned() else {
        let known: Vec<String> = config.quotas().map(|def| def.resource.clone()).collect();
        invalid_argument(
            format!("resource \"{resource}\" is not under quota"),
            Some(if known.is_empty() {
                "No table is under quota yet: see tenant_scale.enforce_quota().".into()
            } else {
                format!("Resources under quota: {}.", known.join(", "))
            }),
        );
    };
    let limit = config.limit(company, &def);
    let used = rows_used(&config, &def, company) + rows_in_flight(&def, company);
    limit.max_rows.is_none_or(|max_rows| used + n <= max_rows)
}

/// Recounts each company's rows of `relation` (of every table under quota when NULL) and corrects the
/// counters that disagree, returning one row per correction. Counters cannot drift through anything
/// tenant_scale sees; this repairs what bypasses triggers (session_replication_role = replica,
/// disabled triggers). Writers of the table wait until the calling transaction ends.
#[pg_extern(volatile)]
fn reconcile(
    relation: default!(Option<PgRelation>, "NULL"),
) -> TableIterator<
    'static,
    (name!(relation, String), name!(company_id, String), name!(counted, i64), name!(actual, i64)),
> {
    let config = config::current();
    let defs: Vec<std::rc::Rc<QuotaDef>> = match &relation {
        Some(relation) => vec![quota_of(&config, relation)],
        None => config.quotas().cloned().collect(),
    };
    let mut corrections = Vec::new();
    for def in defs {
        // SAFETY: opening a relation known to exist (its quota row references it), with a lock that
        // makes writers wait and waits for those in flight.
        let table = unsafe { PgRelation::with_lock(def.relid, pg_sys::ShareLock as pg_sys::LOCKMODE) };
        require_trigger_privilege(&table, "reconcile the quota");
        require_no_changes_in_transaction(&def, "reconcile the quota on");
        let actual = actual_counts(&config, &def);
        corrections.extend(
            correct(&config, &def, &actual)
                .into_iter()
                .map(|(company, counted, actual)| (def.relation.clone(), company, counted, actual)),
        );
    }
    TableIterator::new(corrections)
}

fn actual_counts(config: &Config, def: &QuotaDef) -> HashMap<String, i64> {
    let column = quote_identifier(&def.column);
    as_extension_owner(config.owner, || {
        Spi::connect(|client| {
            client
                .select(
                    &format!(
                        "SELECT {column}::pg_catalog.text, pg_catalog.count(*) FROM ONLY {} \
                         WHERE {column} IS NOT NULL GROUP BY 1",
                        def.relation
                    ),
                    None,
                    &[],
                )
                .or_raise("counting rows per company")
                .filter_map(|row| Some((row.get::<String>(1).ok()??, row.get::<i64>(2).ok()??)))
                .collect()
        })
    })
}

/// (company, counter before, actual) for every counter of `def` that disagreed, now corrected.
fn correct(config: &Config, def: &QuotaDef, actual: &HashMap<String, i64>) -> Vec<(String, i64, i64)> {
    match counters::shared() {
        Some(shared) => {
            // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
            let database = unsafe { pg_sys::MyDatabaseId };
            let by_key: HashMap<CounterKey, i64> = actual
                .iter()
                .map(|(company, rows)| (CounterKey::new(database, def.quota_id, company.as_bytes()), *rows))
                .collect();
            shared
                .correct_quota(database, def.quota_id, |key| by_key.get(key).copied().unwrap_or(0))
                .into_iter()
                .map(|(key, counted, rows)| (key.company_label(), counted, rows))
                .collect()
        }
        None => {
            let counted: Vec<(String, i64)> = as_extension_owner(config.owner, || {
                Spi::connect(|client| {
                    client
                        .select(
                            "SELECT company_id, used FROM tenant_scale.quota_usage
                             WHERE quota_id OPERATOR(pg_catalog.=) $1
                               AND built_at OPERATOR(pg_catalog.=) pg_catalog.pg_postmaster_start_time()",
                            None,
                            &[def.quota_id.into()],
                        )
                        .or_raise("reading the usage rows")
                        .filter_map(|row| Some((row.get::<String>(1).ok()??, row.get::<i64>(2).ok()??)))
                        .collect()
                })
            });
            counted
                .into_iter()
                .filter_map(|(company, used)| {
                    let rows = actual.get(&company).copied().unwrap_or(0);
                    (used != rows).then(|| {
                        slow::write_committed_count(config, def.quota_id, &company, rows);
                        (company, used, rows)
                    })
                })
                .collect()
        }
    }
}

/// Shared counters in use, how many fit (tenant_scale.max_quota_counters), and how many were evicted
/// since the server started: for sizing the setting. Needs tenant_scale preloaded.
#[pg_extern(volatile)]
fn quota_counters() -> TableIterator<'static, (name!(in_use, i64), name!(capacity, i64), name!(evicted, i64))>
{
    let (in_use, capacity, evicted) = counters::REGION.get("quota counter statistics").usage();
    TableIterator::once((in_use, capacity, evicted as i64))
}

/// Counters recounted per table by the health check: enough to catch drift, few enough to stay fast.
const HEALTH_SAMPLE: usize = 20;

/// The `quotas` row of tenant_scale.health(): counters of every table under quota compared with a
/// recount of a sample of companies. A counter counts as disagreeing only when no transaction held
/// it and its value did not move while its rows were being counted, so rows committed meanwhile are
/// never mistaken for drift.
#[pg_extern(volatile)]
fn health_quotas() -> TableIterator<'static, (name!(check, String), name!(ok, bool), name!(detail, String))> {
    let config = config::current();
    let defs: Vec<_> = config.quotas().cloned().collect();
    if defs.is_empty() {
        return TableIterator::once(("quotas".into(), true, "no table is under quota".into()));
    }
    let mut checked = 0;
    let mut disagreeing = Vec::new();
    for def in &defs {
        for (company, counted) in sample_counters(&config, def) {
            let Some(datum) = def.company_datum(&company) else { continue };
            let actual = count_rows(&config, def, datum, &company, Seeing::Committed);
            // The counter again: if it moved, a transaction committed while we counted.
            if still_counted(&config, def, &company, counted) {
                checked += 1;
                if actual != counted {
                    disagreeing.push(format!(
                        "{} company \"{company}\": counter {counted}, rows {actual}",
                        def.relation
                    ));
                }
            }
        }
    }
    let tables = defs.len();
    let detail = if disagreeing.is_empty() {
        format!("{tables} table(s) under quota; {checked} counter(s) recounted, all match")
    } else {
        format!("{}; SELECT * FROM tenant_scale.reconcile() corrects them", disagreeing.join("; "))
    };
    TableIterator::once(("quotas".into(), disagreeing.is_empty(), detail))
}

/// Up to HEALTH_SAMPLE (company, rows counted) of `def` that no transaction holds right now.
fn sample_counters(config: &Config, def: &QuotaDef) -> Vec<(String, i64)> {
    match counters::shared() {
        Some(shared) => shared
            // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
            .sample_idle(unsafe { pg_sys::MyDatabaseId }, def.quota_id, HEALTH_SAMPLE)
            .into_iter()
            .filter_map(|(key, used)| Some((String::from_utf8(key.company()?.to_vec()).ok()?, used)))
            .collect(),
        None => as_extension_owner(config.owner, || {
            Spi::connect(|client| {
                client
                    .select(
                        "SELECT company_id, used FROM tenant_scale.quota_usage
                         WHERE quota_id OPERATOR(pg_catalog.=) $1
                           AND built_at OPERATOR(pg_catalog.=) pg_catalog.pg_postmaster_start_time()
                         LIMIT $2",
                        None,
                        &[def.quota_id.into(), (HEALTH_SAMPLE as i64).into()],
                    )
                    .or_raise("sampling the usage rows")
                    .filter_map(|row| Some((row.get::<String>(1).ok()??, row.get::<i64>(2).ok()??)))
                    .collect()
            })
        }),
    }
}

fn still_counted(config: &Config, def: &QuotaDef, company: &str, counted: i64) -> bool {
    match counters::shared() {
        // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
        Some(shared) => {
            shared.idle_used(&CounterKey::new(
                unsafe { pg_sys::MyDatabaseId },
                def.quota_id,
                company.as_bytes(),
            )) == Some(counted)
        }
        None => slow::peek_committed_count(config, def.quota_id, company) == Some(counted),
    }
}
