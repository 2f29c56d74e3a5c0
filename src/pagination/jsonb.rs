//! keyset_page's result, assembled in jsonb's own form with PostgreSQL's builder: no value passes
//! through text or a Rust JSON type, so nothing is reformatted or rounded.
//!
//! Each row becomes the object `to_jsonb(row)` would make, but its values are converted here, column by
//! column, in a way chosen once per call (`ValueForm`): `to_jsonb` looks each column's type up again
//! for every value, prints numbers and parses them back, and builds every row as a jsonb value of its
//! own that the page then unpacks again, which together took a third of a call's instructions. The
//! common built-in types are converted exactly as `to_jsonb` converts them (same PostgreSQL functions
//! for dates and numbers); every other type, domains and arrays included, is converted by
//! `to_jsonb(column)` in the page statement and spliced in, so the result never depends on how complete
//! the list here is (tests/integration/tests/pagination.rs compares pages with `to_jsonb` for every kind).

use std::ptr;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::pg_sys::{self, JsonbIteratorToken as Token, jbvType};
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// The fields of a page after its rows.
pub(super) struct PageTail<'a> {
    pub page_size: i32,
    pub has_next: bool,
    pub has_prev: bool,
    pub next_cursor: Option<&'a str>,
    pub prev_cursor: Option<&'a str>,
}

/// How the values of one column become jsonb values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ValueForm {
    /// int2, int4, int8: a JSON number.
    Integer(pg_sys::Oid),
    /// A JSON number, or a string for NaN and the infinities (which JSON numbers cannot hold).
    Numeric,
    Bool,
    /// text and varchar: a JSON string of the same characters.
    Text,
    /// date, timestamp, timestamptz: the ISO 8601 string `to_jsonb` writes (JsonEncodeDateTime).
    DateTime(pg_sys::Oid),
    /// A jsonb value spliced in as it is: a jsonb column, or `to_jsonb(column)` for any other type.
    Jsonb,
}

impl ValueForm {
    /// The form for a column of this type read as it is; `None` when the statement must convert it
    /// with `to_jsonb(column)` (then its form is `Jsonb`).
    pub(super) fn of_type(type_oid: pg_sys::Oid) -> Option<ValueForm> {
        Some(match type_oid {
            pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => ValueForm::Integer(type_oid),
            pg_sys::NUMERICOID => ValueForm::Numeric,
            pg_sys::BOOLOID => ValueForm::Bool,
            pg_sys::TEXTOID | pg_sys::VARCHAROID => ValueForm::Text,
            pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => ValueForm::DateTime(type_oid),
            pg_sys::JSONBOID => ValueForm::Jsonb,
            _ => return None,
        })
    }
}

/// One column of the row objects: its name (the key) and the form of its values.
pub(super) struct RowColumn {
    pub name: String,
    pub form: ValueForm,
}

/// `{"data": [rows], "page_size": n, "has_next": b, "has_prev": b, "next_cursor": t, "prev_cursor": t}`,
/// allocated in the current memory context; each row is an object of `columns`, its values in the
/// same order (`None` for SQL NULL).
///
/// # Safety
/// Every value must be a datum of its column's form that stays valid during the call.
pub(super) unsafe fn page<'r>(
    rows: impl Iterator<Item = &'r [Option<pg_sys::Datum>]>,
    columns: &[RowColumn],
    tail: &PageTail,
) -> pg_sys::Datum {
    let mut builder = Builder(ptr::null_mut());
    unsafe {
        builder.push(Token::WJB_BEGIN_OBJECT, None);
        builder.key("data");
        builder.push(Token::WJB_BEGIN_ARRAY, None);
        for row in rows {
            builder.push(Token::WJB_BEGIN_OBJECT, None);
            for (column, value) in columns.iter().zip(row) {
                builder.key(&column.name);
                let mut value = match value {
                    Some(datum) => json_value(column.form, *datum),
                    None => scalar(jbvType::jbvNull),
                };
                builder.push(Token::WJB_VALUE, Some(&mut value));
            }
            builder.push(Token::WJB_END_OBJECT, None);
        }
        builder.push(Token::WJB_END_ARRAY, None);
        builder.key("page_size");
        let mut numeric = json_value(ValueForm::Integer(pg_sys::INT4OID), tail.page_size.into());
        builder.push(Token::WJB_VALUE, Some(&mut numeric));
        for (name, flag) in [("has_next", tail.has_next), ("has_prev", tail.has_prev)] {
            builder.key(name);
            let mut boolean = scalar(jbvType::jbvBool);
            boolean.val.boolean = flag;
            builder.push(Token::WJB_VALUE, Some(&mut boolean));
        }
        for (name, cursor) in [("next_cursor", tail.next_cursor), ("prev_cursor", tail.prev_cursor)] {
            builder.key(name);
            let mut value = cursor.map_or_else(|| scalar(jbvType::jbvNull), string);
            builder.push(Token::WJB_VALUE, Some(&mut value));
        }
        let page = builder.push(Token::WJB_END_OBJECT, None);
        pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(page))
    }
}

/// PostgreSQL's jsonb parse state; pushed values are copied into it (strings by reference, so they
/// must outlive the builder's use, which `page` guarantees by borrowing them for the whole call).
struct Builder(*mut pg_sys::JsonbParseState);

impl Builder {
    unsafe fn push(
        &mut self,
        token: Token::Type,
        value: Option<&mut pg_sys::JsonbValue>,
    ) -> *mut pg_sys::JsonbValue {
        let value = value.map_or(ptr::null_mut(), ptr::from_mut);
        unsafe { pg_sys::pushJsonbValue(&mut self.0, token, value) }
    }

    unsafe fn key(&mut self, name: &str) {
        let mut key = string(name);
        unsafe { self.push(Token::WJB_KEY, Some(&mut key)) };
    }
}

fn scalar(kind: jbvType::Type) -> pg_sys::JsonbValue {
    pg_sys::JsonbValue { type_: kind, val: Default::default() }
}

fn string(text: &str) -> pg_sys::JsonbValue {
    let mut value = scalar(jbvType::jbvString);
    // The builder only reads through the pointer; cursors and key names are far below 2^31 bytes.
    value.val.string.len = text.len() as i32;
    value.val.string.val = text.as_ptr().cast_mut().cast();
    value
}

/// The jsonb value of one non-NULL datum, as `to_jsonb` makes it (see `datum_to_jsonb` in jsonb.c).
unsafe fn json_value(form: ValueForm, datum: pg_sys::Datum) -> pg_sys::JsonbValue {
    unsafe {
        match form {
            ValueForm::Integer(type_oid) => {
                let mut value = scalar(jbvType::jbvNumeric);
                value.val.numeric = integer_to_numeric(type_oid, datum);
                value
            }
            ValueForm::Numeric => {
                // The jsonb container copies a numeric with its 4-byte header (detoasting makes one).
                let numeric = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
                if numeric_is_special(numeric) {
                    let text = pgrx::direct_function_call_as_datum(pg_sys::numeric_out, &[Some(datum)]);
                    owned_string(text.expect("numeric_out returns a value").cast_mut_ptr())
                } else {
                    let mut value = scalar(jbvType::jbvNumeric);
                    value.val.numeric = numeric.cast();
                    value
                }
            }
            ValueForm::Bool => {
                let mut value = scalar(jbvType::jbvBool);
                value.val.boolean = datum.value() != 0;
                value
            }
            ValueForm::Text => {
                let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
                let length = pgrx::varsize_any_exhdr(text);
                check_string_length(length);
                let mut value = scalar(jbvType::jbvString);
                value.val.string.len = length as i32;
                value.val.string.val = pgrx::vardata_any(text).cast_mut();
                value
            }
            ValueForm::DateTime(type_oid) => {
                owned_string(pg_sys::JsonEncodeDateTime(ptr::null_mut(), datum, type_oid, ptr::null()))
            }
            ValueForm::Jsonb => {
                // The container needs the plain 4-byte header form (not short, not compressed).
                let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
                let mut value = scalar(jbvType::jbvBinary);
                value.val.binary.len = pgrx::varsize_any_exhdr(jsonb.cast()) as i32;
                value.val.binary.data = ptr::addr_of_mut!((*jsonb).root);
                // A scalar is stored as a one-element array; the builder takes it only as the scalar.
                if (*jsonb).root.header & pg_sys::JB_FSCALAR != 0 {
                    let found = pg_sys::JsonbExtractScalar(value.val.binary.data, &mut value);
                    debug_assert!(found, "a scalar container holds a scalar");
                }
                value
            }
        }
    }
}

/// An int2, int4 or int8 datum as a numeric (DatumGetInt16/32/64 are truncations of the word).
#[cfg(not(feature = "pg13"))]
unsafe fn integer_to_numeric(type_oid: pg_sys::Oid, datum: pg_sys::Datum) -> pg_sys::Numeric {
    let integer = match type_oid {
        pg_sys::INT2OID => i64::from(datum.value() as i16),
        pg_sys::INT4OID => i64::from(datum.value() as i32),
        _ => datum.value() as i64,
    };
    unsafe { pg_sys::int64_to_numeric(integer) }
}

/// PostgreSQL 13 does not export int64_to_numeric: its SQL-callable casts instead.
#[cfg(feature = "pg13")]
unsafe fn integer_to_numeric(type_oid: pg_sys::Oid, datum: pg_sys::Datum) -> pg_sys::Numeric {
    let to_numeric: unsafe fn(pg_sys::FunctionCallInfo) -> pg_sys::Datum = match type_oid {
        pg_sys::INT2OID => pg_sys::int2_numeric,
        pg_sys::INT4OID => pg_sys::int4_numeric,
        _ => pg_sys::int8_numeric,
    };
    let numeric = unsafe { pgrx::direct_function_call_as_datum(to_numeric, &[Some(datum)]) };
    numeric.expect("intN_numeric returns a value").cast_mut_ptr()
}

/// NaN or an infinity: the sign bits of a numeric's first header word say "special" (NUMERIC_SPECIAL
/// in numeric.c; PostgreSQL 13, which has only NaN, marks it the same way).
unsafe fn numeric_is_special(numeric: *const pg_sys::varlena) -> bool {
    const SIGN_MASK: u16 = 0xC000;
    unsafe { pgrx::vardata_any(numeric).cast::<u16>().read_unaligned() & SIGN_MASK == SIGN_MASK }
}

/// A NUL-terminated string allocated for this call, as a JSON string value.
unsafe fn owned_string(text: *const std::ffi::c_char) -> pg_sys::JsonbValue {
    let length = unsafe { std::ffi::CStr::from_ptr(text) }.to_bytes().len();
    check_string_length(length);
    let mut value = scalar(jbvType::jbvString);
    value.val.string.len = length as i32;
    value.val.string.val = text.cast_mut();
    value
}

/// jsonb's limit on one string (JENTRY_OFFLENMASK), with the error `to_jsonb` raises past it.
fn check_string_length(length: usize) {
    if length > pg_sys::JENTRY_OFFLENMASK as usize {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            "string too long to represent as jsonb string",
            "tenant_scale.keyset_page",
        )
        .set_detail(format!(
            "Due to an implementation restriction, jsonb strings cannot exceed {} bytes.",
            pg_sys::JENTRY_OFFLENMASK
        ))
        .report(PgLogLevel::ERROR);
    }
}
