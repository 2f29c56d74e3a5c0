//! keyset_page's settings as one backend sees them: the cursor secret (`tenant_scale.cursor_secret`)
//! and the per-relation page limits (`tenant_scale.page_limits`).
//!
//! Both tables are readable by their owner only (the secret must stay secret), so they are read as the
//! extension's owner (crate::elevated), in a fixed, fully qualified query with the relation OID as its
//! only (bound) parameter.
//!
//! Every page needs them, so each backend caches what it read. A statement trigger on both tables
//! (`pagination_settings_changed`, sql/pagination.sql) queues a relcache invalidation of the changed
//! table; PostgreSQL delivers it to every backend (and to standbys, through WAL) when the change
//! commits, and to the changing backend itself at once, and our relcache callback then drops the
//! whole cache. The cache lives in one backend's memory and is touched only by that backend's single
//! thread; no borrow of it is held across a call into PostgreSQL.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

use super::kept_plan;
use crate::backend_local::BackendLocal;
use crate::elevated::{as_extension_owner, extension_owner};

struct Cached {
    secret: Vec<u8>,
    limits: HashMap<pg_sys::Oid, Option<i32>>,
    /// page_limits and cursor_secret: an invalidation of either drops the cache.
    watched: [pg_sys::Oid; 2],
}

static CACHE: BackendLocal<RefCell<Option<Cached>>> = BackendLocal::new(RefCell::new(None));
static CALLBACK_REGISTERED: BackendLocal<Cell<bool>> = BackendLocal::new(Cell::new(false));

/// The cursor secret and `relation`'s own page limit (`None`: the GUC applies).
pub(super) fn for_relation(relation: pg_sys::Oid) -> (Vec<u8>, Option<i32>) {
    let cached = CACHE.with(|cache| {
        let cache = cache.borrow();
        let cached = cache.as_ref()?;
        Some((cached.secret.clone(), *cached.limits.get(&relation)?))
    });
    if let Some(hit) = cached {
        return hit;
    }
    let (secret, limit, watched) = read_as_superuser(relation);
    register_callback();
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let cached =
            cache.get_or_insert_with(|| Cached { secret: secret.clone(), limits: HashMap::new(), watched });
        cached.limits.insert(relation, limit);
    });
    (secret, limit)
}

fn read_as_superuser(relation: pg_sys::Oid) -> (Vec<u8>, Option<i32>, [pg_sys::Oid; 2]) {
    const SETTINGS: &str = "SELECT (SELECT secret FROM tenant_scale.cursor_secret), \
                            (SELECT max_page_size FROM tenant_scale.page_limits WHERE relation = $1), \
                            'tenant_scale.page_limits'::pg_catalog.regclass::pg_catalog.oid, \
                            'tenant_scale.cursor_secret'::pg_catalog.regclass::pg_catalog.oid";
    type Row = (Option<Vec<u8>>, Option<i32>, Option<pg_sys::Oid>, Option<pg_sys::Oid>);
    let settings = as_extension_owner(extension_owner(), || {
        Spi::connect(|client| -> SpiResult<Row> {
            let plan = kept_plan(client, SETTINGS, &[pg_sys::REGCLASSOID])?;
            // SAFETY: an OID is a valid regclass datum.
            let args = [unsafe { DatumWithOid::new(relation, pg_sys::REGCLASSOID) }];
            let row = client.select(&*plan, Some(1), &args)?.first();
            Ok((row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
        })
    });
    match settings {
        Ok((Some(secret), limit, Some(page_limits), Some(cursor_secret))) => {
            (secret, limit, [page_limits, cursor_secret])
        }
        Ok(_) => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "tenant_scale.cursor_secret holds no secret",
                "tenant_scale.keyset_page",
            )
            .set_detail(
                "Cursors are signed with the secret in tenant_scale.cursor_secret, and its row was deleted.",
            )
            .set_hint("As a superuser, run SELECT tenant_scale.rotate_cursor_secret();")
            .report(PgLogLevel::ERROR);
            unreachable!("an ERROR report does not return")
        }
        Err(error) => pgrx::error!("tenant_scale: reading pagination settings failed: {error}"),
    }
}

fn register_callback() {
    if CALLBACK_REGISTERED.with(Cell::get) {
        return;
    }
    // SAFETY: registers a plain function for the rest of this backend's life, once.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_settings), pg_sys::Datum::from(0)) };
    CALLBACK_REGISTERED.with(|registered| registered.set(true));
}

/// Relcache callback: `relid` is invalid when every relation is invalidated (cache reset).
#[pg_guard]
unsafe extern "C-unwind" fn forget_settings(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CACHE.with(|cache| {
        if let Ok(mut cache) = cache.try_borrow_mut()
            && (relid == pg_sys::InvalidOid
                || cache.as_ref().is_some_and(|cached| cached.watched.contains(&relid)))
        {
            *cache = None;
        }
    });
}

/// Statement trigger on page_limits and cursor_secret: tells every backend to drop its cached
/// settings once this change commits.
#[pg_trigger]
fn pagination_settings_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    // SAFETY: queues an invalidation message for a relation that exists (the trigger's own table).
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(trigger.relid()?) };
    Ok(None)
}
