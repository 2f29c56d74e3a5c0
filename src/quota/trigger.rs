//! The quota trigger: enforce_quota installs it on each enforced table as one BEFORE INSERT OR UPDATE
//! OR DELETE row trigger (an UPDATE counts only when the company's text changes) and one AFTER
//! TRUNCATE statement trigger.
//!
//! It must see each row exactly as it will be written, so it must be the last BEFORE ROW trigger of
//! its event: one firing later could change the company or cancel the row after it was counted.
//! Triggers fire in name order, hence the name `zz_tenant_scale_quota`; and rather than trust names,
//! it checks on every row that no enabled BEFORE ROW trigger of the same event follows it, and
//! refuses to run if one does.
//!
//! This is the per-row path of every insert, bulk loads included: no table lookups (the
//! configuration is cached, config.rs), no allocation for integer or text companies, and for a
//! company already touched by the transaction, one hash lookup and one compare-and-swap.

use std::cell::Cell;
use std::convert::Infallible;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, PgTrigger};

use super::config::{self, QuotaDef};
use super::ledger::{self, Change};
use crate::backend_local::BackendLocal;

/// Names that sort after ordinary trigger names (BEFORE triggers fire in name order).
pub(super) const ROW_TRIGGER: &str = "zz_tenant_scale_quota";
pub(super) const TRUNCATE_TRIGGER: &str = "zz_tenant_scale_quota_truncate";

/// Buffer for a row's company text, reused from row to row.
static COMPANY: BackendLocal<Cell<Vec<u8>>> = BackendLocal::new(Cell::new(Vec::new()));

#[pg_trigger]
fn quota_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let data = trigger.trigger_data();
    let config = config::current();
    // SAFETY: the relation a trigger fires on is open and locked for the trigger's duration.
    let relation = unsafe { &*data.tg_relation };
    let Some(def) = config.quota(relation.rd_id) else {
        // Reached only when the quotas row is gone but the triggers are not (a manual DELETE).
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {} has tenant_scale quota triggers but no quota", relation_name(relation)),
            function_name!(),
        )
        .set_hint("Call tenant_scale.enforce_quota() on the table again, or drop its zz_tenant_scale_quota triggers.")
        .report(PgLogLevel::ERROR);
        unreachable!()
    };
    let event = data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    if event == pg_sys::TRIGGER_EVENT_TRUNCATE {
        ledger::record_truncate(&config, def);
        return Ok(None);
    }
    ensure_fires_last(data, relation);
    let mut company = COMPANY.with(Cell::take);
    match event {
        pg_sys::TRIGGER_EVENT_INSERT => {
            if let Some(datum) = company_of(def, data.tg_trigtuple, relation, &mut company) {
                ledger::record_row(&config, def, &company, datum, Change::Insert);
            }
        }
        pg_sys::TRIGGER_EVENT_UPDATE => {
            let mut old_company = Vec::new();
            let old = company_of(def, data.tg_trigtuple, relation, &mut old_company);
            let new = company_of(def, data.tg_newtuple, relation, &mut company);
            if old.is_some() != new.is_some() || old_company != company {
                // The new company first: if it is full, nothing has been noted for the old one.
                if let Some(datum) = new {
                    ledger::record_row(&config, def, &company, datum, Change::Insert);
                }
                if let Some(datum) = old {
                    ledger::record_row(&config, def, &old_company, datum, Change::Delete);
                }
            }
        }
        _ => {
            if let Some(datum) = company_of(def, data.tg_trigtuple, relation, &mut company) {
                ledger::record_row(&config, def, &company, datum, Change::Delete);
            }
        }
    }
    COMPANY.with(|buffer| buffer.set(company));
    Ok(if event == pg_sys::TRIGGER_EVENT_DELETE { trigger.old() } else { trigger.new() })
}

/// The company of `tuple` (None when NULL), its text written into `text`.
fn company_of(
    def: &QuotaDef,
    tuple: *mut pg_sys::HeapTupleData,
    relation: &pg_sys::RelationData,
    text: &mut Vec<u8>,
) -> Option<pg_sys::Datum> {
    let mut is_null = false;
    // SAFETY: the trigger's tuple and its relation's descriptor; the attribute number was checked
    // against the relation when the configuration was loaded (and a relcache change reloads it).
    let datum = unsafe { pg_sys::heap_getattr(tuple, def.attnum.into(), relation.rd_att, &mut is_null) };
    if is_null {
        return None;
    }
    // SAFETY: a non-NULL value of the company column, whose type the text form was made for.
    unsafe { def.text_form.write(datum, text) };
    Some(datum)
}

/// Refuses to count a row that a later BEFORE ROW trigger of the same event could still change.
fn ensure_fires_last(data: &pg_sys::TriggerData, relation: &pg_sys::RelationData) {
    // SAFETY: the trigger descriptor of an open relation with triggers, and the firing trigger.
    unsafe {
        let descriptor = &*relation.trigdesc;
        let triggers = std::slice::from_raw_parts(descriptor.triggers, descriptor.numtriggers as usize);
        let ours = (*data.tg_trigger).tgoid;
        let event_bit = match data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => pg_sys::TRIGGER_TYPE_INSERT,
            pg_sys::TRIGGER_EVENT_UPDATE => pg_sys::TRIGGER_TYPE_UPDATE,
            _ => pg_sys::TRIGGER_TYPE_DELETE,
        } as i16;
        let before_row = (pg_sys::TRIGGER_TYPE_ROW | pg_sys::TRIGGER_TYPE_BEFORE) as i16;
        let later = triggers.iter().skip_while(|trigger| trigger.tgoid != ours).skip(1).find(|trigger| {
            trigger.tgenabled != pg_sys::TRIGGER_DISABLED as std::ffi::c_char
                && trigger.tgtype & before_row == before_row
                && trigger.tgtype & event_bit != 0
        });
        if let Some(later) = later {
            let name = std::ffi::CStr::from_ptr(later.tgname).to_string_lossy();
            let our_name = std::ffi::CStr::from_ptr((*data.tg_trigger).tgname).to_string_lossy();
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("trigger \"{name}\" on table {} fires after the tenant_scale quota trigger", relation_name(relation)),
                function_name!(),
            )
            .set_detail("The quota trigger must see each row as it will be written; a BEFORE trigger firing after it could change or cancel the row.")
            .set_hint(format!("Rename \"{name}\" so that its name sorts before \"{our_name}\" (BEFORE triggers fire in name order)."))
            .report(PgLogLevel::ERROR);
        }
    }
}

fn relation_name(relation: &pg_sys::RelationData) -> String {
    crate::elevated::qualified_relation_name(relation.rd_id).unwrap_or_else(|| relation.rd_id.to_string())
}
