//! Backend-local cache of the quota configuration: which tables are enforced (and how to read and
//! count their company column), the plans with their ranks and limits, and the plan of each company.
//!
//! The per-row path must not read tables, so everything it needs comes from here, loaded on first use
//! and dropped when the configuration changes. Changes reach every backend as relcache invalidations:
//! a statement trigger on each configuration table (`quota_config_changed`) invalidates that table's
//! relcache entry, which PostgreSQL delivers to every backend at its next transaction or lock
//! acquisition (and to the changing backend at its next command). Invalidations are transactional, so
//! no backend acts on a change that has not committed. The callback only raises flags; the reload
//! happens on next use, outside any catalog access.
//!
//! The `companies` table changes with every sign-up, so it is cached separately, one company at a
//! time: a change to it forgets the company plans without reloading the rest.

use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use rustc_hash::FxHashMap;

use super::company::TextForm;
use crate::backend_local::BackendLocal;
use crate::elevated::{
    OrRaise, as_extension_owner, extension_owner, qualified_relation_name, quote_identifier,
};

pub(super) static DEFAULT_PLAN: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"free"));

pub(super) fn register_gucs() {
    GucRegistry::define_string_guc(
        c"tenant_scale.default_plan",
        c"Plan of companies that are not listed in tenant_scale.companies.",
        c"Names a row of tenant_scale.plans. Only superusers can change it, so that an application \
          session cannot move its unlisted companies to a larger plan.",
        &DEFAULT_PLAN,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// How the quota of one enforced table reads and counts the company of its rows.
pub(super) struct QuotaDef {
    pub quota_id: i64,
    pub relid: pg_sys::Oid,
    /// `schema.table`, quoted where needed: for SQL text and messages.
    pub relation: String,
    pub resource: String,
    pub column: String,
    pub attnum: i16,
    pub company_type: pg_sys::Oid,
    pub text_form: TextForm,
    /// `SELECT count(*)` of one company's rows: $1 the company in the column's type, $2 as text. Uses
    /// the company index's own equality operator, so the index serves it, and compares the text form
    /// too, so that types whose equality is looser than their text (numeric scale, citext) still count
    /// exactly the rows whose text is the counter's key.
    pub count_sql: String,
    /// The resource's limit under each plan, by plan index (None: unlimited).
    limits_by_plan: Vec<Option<i64>>,
    input_function: pg_sys::Oid,
    input_ioparam: pg_sys::Oid,
}

impl QuotaDef {
    /// The company's text turned back into the column's type, for count queries. None when the text is
    /// not a valid value of that type: no row can then belong to that company.
    pub fn company_datum(&self, company: &str) -> Option<pg_sys::Datum> {
        let text = CString::new(company).ok()?;
        PgTryBuilder::new(|| {
            // SAFETY: a plain input function call with a valid C string, in the current memory context.
            Some(unsafe {
                pg_sys::OidInputFunctionCall(
                    self.input_function,
                    text.as_ptr().cast_mut(),
                    self.input_ioparam,
                    -1,
                )
            })
        })
        .catch_others(|_| None)
        .execute()
    }
}

/// A limit as it applies to one company: its plan (an index into the configuration's plans, see
/// `Config::plan_name`) and that plan's limit for the resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Limit {
    pub plan: usize,
    /// None: unlimited.
    pub max_rows: Option<i64>,
}

pub(super) struct Config {
    /// The extension's owner: internal SQL runs as this role.
    pub owner: pg_sys::Oid,
    quotas: FxHashMap<pg_sys::Oid, Rc<QuotaDef>>,
    /// Plan names by rank; a plan's index here is how limits refer to it.
    plans: Vec<String>,
    /// Tables whose invalidation means this cache is stale.
    watched: Vec<pg_sys::Oid>,
    companies_relid: pg_sys::Oid,
    /// Plans (indexes) of companies looked up so far; None: not listed (default plan).
    company_plans: RefCell<FxHashMap<String, Option<usize>>>,
    /// The cache generation this configuration is current for (see `generation`), kept here so that
    /// the per-row path compares with it without another access to the cache.
    generation: Cell<u64>,
    /// Holds the function lookup data of the text forms; deleted with the configuration.
    _memory: ConfigMemory,
}

/// A memory context of the configuration's own under TopMemoryContext: it must outlive the
/// statement that loaded the configuration, and go when the configuration is replaced.
struct ConfigMemory(pg_sys::MemoryContext);

impl ConfigMemory {
    fn new() -> ConfigMemory {
        // SAFETY: creating a child of TopMemoryContext, which lives as long as the backend.
        ConfigMemory(unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                c"tenant_scale quota configuration".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
            )
        })
    }
}

impl Drop for ConfigMemory {
    fn drop(&mut self) {
        // SAFETY: a context created above, owned by this value only and never made current.
        unsafe { pg_sys::MemoryContextDelete(self.0) };
    }
}

/// A cache keeps at most this many company plans, so that a backend serving many companies keeps a
/// bounded amount of memory.
const MAX_CACHED_COMPANIES: usize = 100_000;

/// The backend's cache, in one backend-local static (the trigger reaches it on every row). Flags are Cells:
/// the invalidation callback may run whenever PostgreSQL processes invalidations, so it never needs
/// a borrow.
struct Cache {
    current: RefCell<Option<Rc<Config>>>,
    stale: Cell<bool>,
    companies_stale: Cell<bool>,
    generation: Cell<u64>,
    watched: RefCell<Vec<pg_sys::Oid>>,
    companies_relid: Cell<pg_sys::Oid>,
}

#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static CACHE: BackendLocal<Cache> = BackendLocal::new(Cache {
    current: RefCell::new(None),
    stale: Cell::new(true),
    companies_stale: Cell::new(false),
    generation: Cell::new(0),
    watched: RefCell::new(Vec::new()),
    companies_relid: Cell::new(pg_sys::InvalidOid),
});

/// Bumped whenever plans, limits or company plans may have changed: a limit remembered with an older
/// generation must be looked up again.
pub(super) fn generation() -> u64 {
    CACHE.with(|cache| cache.generation.get())
}

pub(super) fn register_invalidation_callback() {
    // SAFETY: registers a plain function for the life of the backend, as extensions do in _PG_init.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CACHE.with(|cache| {
        // InvalidOid means "everything may have changed" (for example after a cache reset). The
        // watched list is only replaced outside catalog access, so it is never borrowed here twice.
        let watched = cache.watched.try_borrow().map_or(true, |watched| watched.contains(&relid));
        if relid == pg_sys::InvalidOid || watched {
            cache.stale.set(true);
        } else if relid == cache.companies_relid.get() {
            cache.companies_stale.set(true);
        } else {
            return;
        }
        cache.generation.set(cache.generation.get() + 1);
    });
}

/// The configuration, loaded if it is missing or stale. Raises an error when the extension is not
/// installed in this database.
pub(super) fn current() -> Rc<Config> {
    let cached = CACHE.with(|cache| {
        if cache.stale.get() {
            return None;
        }
        let config = cache.current.borrow().clone()?;
        if cache.companies_stale.replace(false) {
            config.company_plans.borrow_mut().clear();
        }
        config.generation.set(cache.generation.get());
        Some(config)
    });
    if let Some(config) = cached {
        return config;
    }
    // An invalidation arriving while we read means what we read may already be old: read again.
    for _ in 0..10 {
        CACHE.with(|cache| {
            cache.stale.set(false);
            cache.companies_stale.set(false);
        });
        let config = Rc::new(load());
        let fresh = CACHE.with(|cache| {
            *cache.watched.borrow_mut() = config.watched.clone();
            cache.companies_relid.set(config.companies_relid);
            *cache.current.borrow_mut() = Some(config.clone());
            config.generation.set(cache.generation.get());
            !cache.stale.get()
        });
        if fresh {
            return config;
        }
    }
    CACHE.with(|cache| cache.current.borrow().clone()).unwrap_or_else(|| Rc::new(load()))
}

fn load() -> Config {
    let owner = extension_owner();
    let memory = ConfigMemory::new();
    as_extension_owner(owner, || {
        Spi::connect(|client| {
            let watched: Vec<pg_sys::Oid> = client
                .select(
                    "SELECT c.oid FROM pg_catalog.pg_class c
                     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'tenant_scale'::pg_catalog.regnamespace
                       AND c.relname OPERATOR(pg_catalog.=) ANY ('{plans,plan_limits,quotas}'::pg_catalog.name[])",
                    None,
                    &[],
                )
                .or_raise("reading the configuration tables")
                .filter_map(|row| row.get::<pg_sys::Oid>(1).ok().flatten())
                .collect();
            let companies_relid = client
                .select("SELECT 'tenant_scale.companies'::pg_catalog.regclass::pg_catalog.oid", None, &[])
                .or_raise("reading the companies table")
                .first()
                .get_one::<pg_sys::Oid>()
                .ok()
                .flatten()
                .unwrap_or(pg_sys::InvalidOid);
            let plans: Vec<String> = client
                .select("SELECT plan FROM tenant_scale.plans ORDER BY rank", None, &[])
                .or_raise("reading the plans")
                .filter_map(|row| row.get::<String>(1).ok().flatten())
                .collect();
            let limits: Vec<(String, String, Option<i64>)> = client
                .select("SELECT plan, resource, max_rows FROM tenant_scale.plan_limits", None, &[])
                .or_raise("reading the plan limits")
                .filter_map(|row| {
                    Some((row.get::<String>(1).ok()??, row.get::<String>(2).ok()??, row.get::<i64>(3).ok()?))
                })
                .collect();
            let quotas = client
                .select(QUOTA_DEFS_SQL, None, &[])
                .or_raise("reading the quotas")
                .filter_map(|row| quota_def(&row, &memory, &plans, &limits))
                .map(|def| (def.relid, Rc::new(def)))
                .collect();
            Config {
                owner,
                quotas,
                plans,
                watched,
                companies_relid,
                company_plans: RefCell::new(FxHashMap::default()),
                generation: Cell::new(0),
                _memory: memory,
            }
        })
    })
}

/// Every enforced table with its company column and, when one exists, the equality operator of a
/// valid, non-partial btree index that starts with that column.
const QUOTA_DEFS_SQL: &str = "
    SELECT q.relation::pg_catalog.oid, q.quota_id, q.resource, q.company_column::pg_catalog.text,
           a.attnum, a.atttypid, eq.operator
    FROM tenant_scale.quotas q
    JOIN pg_catalog.pg_attribute a
      ON a.attrelid OPERATOR(pg_catalog.=) q.relation
     AND a.attname OPERATOR(pg_catalog.=) q.company_column AND NOT a.attisdropped
    LEFT JOIN LATERAL (
        SELECT pg_catalog.format('OPERATOR(%I.%s)', n.nspname, o.oprname) AS operator
        FROM pg_catalog.pg_index i
        JOIN pg_catalog.pg_opclass c ON c.oid OPERATOR(pg_catalog.=) i.indclass[0]
        JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) c.opcmethod AND am.amname OPERATOR(pg_catalog.=) 'btree'
        JOIN pg_catalog.pg_amop ao ON ao.amopfamily OPERATOR(pg_catalog.=) c.opcfamily
             AND ao.amoplefttype OPERATOR(pg_catalog.=) a.atttypid
             AND ao.amoprighttype OPERATOR(pg_catalog.=) a.atttypid
             AND ao.amopstrategy OPERATOR(pg_catalog.=) 3
        JOIN pg_catalog.pg_operator o ON o.oid OPERATOR(pg_catalog.=) ao.amopopr
        JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) o.oprnamespace
        WHERE i.indrelid OPERATOR(pg_catalog.=) q.relation AND i.indkey[0] OPERATOR(pg_catalog.=) a.attnum
          AND i.indisvalid AND i.indpred IS NULL
        LIMIT 1
    ) eq ON true";

fn quota_def(
    row: &pgrx::spi::SpiHeapTupleData,
    memory: &ConfigMemory,
    plans: &[String],
    limits: &[(String, String, Option<i64>)],
) -> Option<QuotaDef> {
    let relid = row.get::<pg_sys::Oid>(1).ok()??;
    let resource = row.get::<String>(3).ok()??;
    let limits_by_plan = plans
        .iter()
        .map(|plan| {
            limits
                .iter()
                .find(|(of, limited, _)| of == plan && *limited == resource)
                .and_then(|(_, _, rows)| *rows)
        })
        .collect();
    let column = row.get::<String>(4).ok()??;
    let company_type = row.get::<pg_sys::Oid>(6).ok()??;
    let relation = qualified_relation_name(relid)?;
    let quoted_column = quote_identifier(&column);
    let company_matches = match row.get::<String>(7).ok()? {
        Some(operator) => format!("{quoted_column} {operator} $1 AND "),
        // No usable index (dropped since enforce_quota): still exact, by a sequential scan.
        None => String::new(),
    };
    let count_sql = format!(
        "SELECT pg_catalog.count(*) FROM ONLY {relation} \
         WHERE {company_matches}{quoted_column}::pg_catalog.text OPERATOR(pg_catalog.=) $2"
    );
    let (mut input_function, mut input_ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
    // SAFETY: a catalog lookup for an existing type (it is the type of an existing column).
    unsafe { pg_sys::getTypeInputInfo(company_type, &mut input_function, &mut input_ioparam) };
    Some(QuotaDef {
        quota_id: row.get::<i64>(2).ok()??,
        relid,
        relation,
        resource,
        column,
        attnum: row.get::<i16>(5).ok()??,
        company_type,
        text_form: TextForm::for_type(company_type, memory.0),
        count_sql,
        limits_by_plan,
        input_function,
        input_ioparam,
    })
}

impl Config {
    pub fn quota(&self, relid: pg_sys::Oid) -> Option<&Rc<QuotaDef>> {
        self.quotas.get(&relid)
    }

    /// The cache generation this configuration is current for: a limit remembered with an older one
    /// must be looked up again.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    pub fn quotas(&self) -> impl Iterator<Item = &Rc<QuotaDef>> {
        let mut all: Vec<&Rc<QuotaDef>> = self.quotas.values().collect();
        all.sort_by(|a, b| a.resource.cmp(&b.resource));
        all.into_iter()
    }

    pub fn plan_name(&self, plan: usize) -> &str {
        &self.plans[plan]
    }

    /// The plan a company is on: its row in `companies`, else `tenant_scale.default_plan`. Raises 22023
    /// when that plan does not exist, which only tenant_scale.default_plan can cause (companies.plan
    /// is a foreign key).
    pub fn company_plan(&self, company: &str) -> usize {
        let listed = self.company_plans.borrow().get(company).copied();
        let listed = listed.unwrap_or_else(|| {
            let plan = as_extension_owner(self.owner, || {
                Spi::get_one_with_args::<String>(
                    "SELECT plan FROM tenant_scale.companies WHERE company_id OPERATOR(pg_catalog.=) $1",
                    &[company.into()],
                )
                .ok()
                .flatten()
            });
            let plan = plan.and_then(|name| self.plans.iter().position(|known| *known == name));
            let mut cache = self.company_plans.borrow_mut();
            if cache.len() >= MAX_CACHED_COMPANIES {
                cache.clear();
            }
            cache.insert(company.to_string(), plan);
            plan
        });
        listed.unwrap_or_else(|| {
            let name = default_plan();
            self.plans.iter().position(|known| *known == name).unwrap_or_else(|| {
                pgrx::pg_sys::panic::ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("tenant_scale.default_plan names plan \"{name}\", which does not exist"),
                    function_name!(),
                )
                .set_detail(format!("Company \"{company}\" is not listed in tenant_scale.companies."))
                .set_hint(format!("Set tenant_scale.default_plan to one of: {}.", self.plans.join(", ")))
                .report(PgLogLevel::ERROR);
                unreachable!()
            })
        })
    }

    /// The limit of `def`'s resource for `company`.
    pub fn limit(&self, company: &str, def: &QuotaDef) -> Limit {
        let plan = self.company_plan(company);
        Limit { plan, max_rows: def.limits_by_plan.get(plan).copied().flatten() }
    }

    /// The cheapest plan ranked above `limit`'s that allows more rows of `def`'s resource, with its
    /// limit (None: unlimited).
    pub fn upgrade(&self, def: &QuotaDef, limit: Limit) -> Option<(&str, Option<i64>)> {
        let current = limit.max_rows?;
        (limit.plan + 1..self.plans.len()).find_map(|plan| {
            let max_rows = def.limits_by_plan.get(plan).copied().flatten();
            max_rows.is_none_or(|rows| rows > current).then(|| (self.plans[plan].as_str(), max_rows))
        })
    }
}

fn default_plan() -> String {
    DEFAULT_PLAN.get().map(|plan| plan.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Statement trigger on the configuration tables: tells every backend (at its next transaction) and
/// this one (at its next command) that the cached configuration is stale.
#[pg_trigger]
fn quota_config_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, std::convert::Infallible> {
    // SAFETY: the relation a trigger fires on is open and locked.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid((*trigger.trigger_data().tg_relation).rd_id) };
    Ok(None)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn upgrade_is_the_cheapest_higher_plan_that_allows_more() {
        Spi::run(
            "CREATE TABLE orders (id int, company text);
             CREATE INDEX ON orders (company);
             SELECT tenant_scale.enforce_quota('orders', 'orders', 'company');
             SELECT tenant_scale.set_plan_limit('free', 'orders', 10);
             SELECT tenant_scale.set_plan_limit('basic', 'orders', 10);
             SELECT tenant_scale.set_plan_limit('professional', 'orders', 500);
             SELECT tenant_scale.set_plan_limit('enterprise', 'orders', NULL);",
        )
        .unwrap();
        unsafe { pg_sys::CommandCounterIncrement() };
        let config = super::current();
        let def = config.quotas().next().unwrap().clone();
        let plan = |name: &str| (0..4).find(|&index| config.plan_name(index) == name).unwrap();
        let at = |name: &str, max_rows| super::Limit { plan: plan(name), max_rows };
        assert_eq!(config.upgrade(&def, at("free", Some(10))), Some(("professional", Some(500))));
        assert_eq!(config.upgrade(&def, at("professional", Some(500))), Some(("enterprise", None)));
        assert_eq!(config.upgrade(&def, at("enterprise", None)), None);
    }

    #[pg_test]
    fn company_plan_change_is_seen_at_the_next_command() {
        Spi::run(
            "CREATE TABLE orders (id int, company text);
             CREATE INDEX ON orders (company);
             SELECT tenant_scale.enforce_quota('orders', 'orders', 'company');
             SELECT tenant_scale.set_plan_limit('basic', 'orders', 7);",
        )
        .unwrap();
        unsafe { pg_sys::CommandCounterIncrement() };
        let config = super::current();
        let def = config.quotas().next().unwrap().clone();
        assert_eq!(config.plan_name(config.limit("acme", &def).plan), "free");
        Spi::run("SELECT tenant_scale.set_company_plan('acme', 'basic')").unwrap();
        // What the session's next statement does first: process this transaction's invalidations.
        unsafe { pg_sys::CommandCounterIncrement() };
        let config = super::current();
        let limit = config.limit("acme", &def);
        assert_eq!((config.plan_name(limit.plan), limit.max_rows), ("basic", Some(7)));
    }
}
