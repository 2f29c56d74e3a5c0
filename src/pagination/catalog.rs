//! What `keyset_page` needs to know about the paged relation, read from the relcache, syscache and
//! typecache (no SPI, so resolving a listing costs microseconds): its qualified name, its columns, the
//! columns that make an order unique, and each sort key's btree operators and I/O functions.
//!
//! The relation is opened by the caller with AccessShareLock (the `regclass` argument), which keeps
//! everything read here stable until the end of the transaction.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgList, PgRelation};

use super::invalid;

/// One live column of the relation.
pub(crate) struct Column {
    pub name: String,
    pub attnum: i16,
    pub type_oid: pg_sys::Oid,
    pub typmod: i32,
    pub not_null: bool,
}

pub(crate) fn columns(relation: &PgRelation) -> Vec<Column> {
    relation
        .tuple_desc()
        .iter()
        .filter(|attribute| !attribute.is_dropped())
        .map(|attribute| Column {
            name: attribute.name().to_string(),
            attnum: attribute.attnum,
            type_oid: attribute.type_oid().value(),
            typmod: attribute.type_mod(),
            not_null: attribute.attnotnull,
        })
        .collect()
}

/// `"schema"."relation"`.
pub(crate) fn qualified_name(relation: &PgRelation) -> String {
    format!("{}.{}", quote_ident(relation.namespace()), quote_ident(relation.name()))
}

pub(crate) fn quote_ident(name: &str) -> String {
    // Catalog names never hold NUL; an interior NUL could only come from a bug, not from a user.
    let name = CString::new(name).expect("catalog names hold no NUL byte");
    // SAFETY: quote_identifier returns either its argument or a palloc'd quoted copy, both valid C
    // strings for the duration of this call.
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(name.as_ptr())) }.to_string_lossy().into_owned()
}

/// Attribute numbers of every set of columns that identifies a row: the primary key first, then each
/// unique, non-partial index on plain NOT NULL columns.
pub(crate) fn unique_keys(relation: &PgRelation, columns: &[Column]) -> (Option<Vec<i16>>, Vec<Vec<i16>>) {
    let not_null = |attnum: i16| columns.iter().any(|column| column.attnum == attnum && column.not_null);
    // SAFETY: the relation is open and locked; the index list is a fresh copy owned by us, and each
    // index is opened with AccessShareLock for as long as we read its pg_index row.
    unsafe {
        let primary_key = pg_sys::RelationGetPrimaryKeyIndex(relation.as_ptr());
        let indexes = PgList::<pg_sys::Oid>::from_pg(pg_sys::RelationGetIndexList(relation.as_ptr()));
        let mut primary = None;
        let mut unique = Vec::new();
        for index_oid in indexes.iter_oid() {
            let index = PgRelation::with_lock(index_oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let Some(form) = index.rd_index.as_ref() else { continue };
            if !form.indisunique || !index.rd_indpred.is_null() || !form.indisvalid {
                continue;
            }
            let keys = form.indkey.values.as_slice(form.indnkeyatts as usize).to_vec();
            if index_oid == primary_key {
                primary = Some(keys);
            } else if keys.iter().all(|&attnum| attnum > 0 && not_null(attnum)) {
                unique.push(keys);
            }
        }
        (primary, unique)
    }
}

/// How a sort key or filter column compares, sorts and converts: the btree operators of its type's
/// default operator class (ORDER BY uses the same class) and its text I/O functions.
#[derive(Clone, Debug)]
pub(crate) struct TypeSupport {
    pub less: String,
    pub greater: String,
    pub equal: String,
    input: pg_sys::Oid,
    io_param: pg_sys::Oid,
    output: pg_sys::Oid,
}

/// `None` when the type has no default btree operator class, so ORDER BY could not sort it either.
pub(crate) fn type_support(type_oid: pg_sys::Oid) -> Option<TypeSupport> {
    let flags = pg_sys::TYPECACHE_EQ_OPR | pg_sys::TYPECACHE_LT_OPR | pg_sys::TYPECACHE_GT_OPR;
    // SAFETY: lookup_type_cache returns a pointer into the backend-lifetime type cache (or raises an
    // error for an unknown type); the I/O lookups fill plain out-parameters.
    unsafe {
        let entry = pg_sys::lookup_type_cache(type_oid, flags as i32).as_ref()?;
        if entry.lt_opr == pg_sys::InvalidOid
            || entry.gt_opr == pg_sys::InvalidOid
            || entry.eq_opr == pg_sys::InvalidOid
        {
            return None;
        }
        let (mut input, mut io_param, mut output, mut varlena) =
            (pg_sys::InvalidOid, pg_sys::InvalidOid, pg_sys::InvalidOid, false);
        pg_sys::getTypeInputInfo(type_oid, &mut input, &mut io_param);
        pg_sys::getTypeOutputInfo(type_oid, &mut output, &mut varlena);
        Some(TypeSupport {
            less: qualified_operator(entry.lt_opr),
            greater: qualified_operator(entry.gt_opr),
            equal: qualified_operator(entry.eq_opr),
            input,
            io_param,
            output,
        })
    }
}

impl TypeSupport {
    /// The column type's value for `text`, as its input function reads it. A value the type refuses
    /// becomes SQLSTATE 22023 naming `argument`, with the type's own message as DETAIL.
    pub fn parse(&self, text: &str, typmod: i32, argument: &str, column: &str) -> pg_sys::Datum {
        let Ok(text) = CString::new(text) else {
            invalid(argument, format!("the value for column \"{column}\" contains a NUL character")).raise()
        };
        let (input, io_param) = (self.input, self.io_param);
        PgTryBuilder::new(|| {
            // SAFETY: a valid input function for the type, a NUL-terminated string; errors are
            // PostgreSQL errors, caught below.
            unsafe { pg_sys::OidInputFunctionCall(input, text.as_ptr().cast_mut(), io_param, typmod) }
        })
        .catch_others(|error| {
            let detail = match &error {
                pg_sys::panic::CaughtError::PostgresError(report)
                | pg_sys::panic::CaughtError::ErrorReport(report) => report.message().to_string(),
                pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            };
            invalid(argument, format!("the value for column \"{column}\" is not valid for its type"))
                .detail(detail)
                .raise()
        })
        .execute()
    }

    /// The value's text form, as the type's output function writes it.
    pub fn render(&self, datum: pg_sys::Datum) -> String {
        // SAFETY: the datum is a non-null value of this type (SPI hands out nulls as None); the
        // output function returns a palloc'd C string, freed here.
        unsafe {
            let text = pg_sys::OidOutputFunctionCall(self.output, datum);
            let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
            pg_sys::pfree(text.cast());
            owned
        }
    }
}

/// `OPERATOR("schema".op)`: the operator itself, whatever the caller's search_path holds.
fn qualified_operator(operator: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup by OID; the tuple is released before returning and the strings read
    // from it are copied first.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::OPEROID as i32, operator.into());
        if tuple.is_null() {
            pgrx::error!("tenant_scale: operator {operator:?} vanished from pg_operator");
        }
        let form = (pg_sys::GETSTRUCT(tuple) as pg_sys::Form_pg_operator)
            .as_ref()
            .expect("GETSTRUCT of a valid tuple is not null");
        let name = CStr::from_ptr(form.oprname.data.as_ptr()).to_string_lossy().into_owned();
        let namespace_oid = form.oprnamespace;
        pg_sys::ReleaseSysCache(tuple);
        let namespace =
            CStr::from_ptr(pg_sys::get_namespace_name(namespace_oid)).to_string_lossy().into_owned();
        format!("OPERATOR({}.{name})", quote_ident(&namespace))
    }
}
