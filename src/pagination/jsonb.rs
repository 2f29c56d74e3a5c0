//! keyset_page's result, assembled in jsonb's own form.
//!
//! The rows arrive as jsonb (`to_jsonb` in the page statement) and are spliced into the page with
//! PostgreSQL's own builder, as `jsonb_agg` does: no value is printed as text and parsed again (which
//! took a third of a call's time), and none passes through a Rust JSON type, so nothing is rounded.

use std::ptr;

use pgrx::IntoDatum;
use pgrx::pg_sys::{self, JsonbIteratorToken as Token, jbvType};

/// The fields of a page after its rows.
pub(super) struct PageTail<'a> {
    pub page_size: i32,
    pub has_next: bool,
    pub has_prev: bool,
    pub next_cursor: Option<&'a str>,
    pub prev_cursor: Option<&'a str>,
}

/// `{"data": [rows], "page_size": n, "has_next": b, "has_prev": b, "next_cursor": t, "prev_cursor": t}`,
/// allocated in the current memory context. A `None` row is JSON null.
///
/// # Safety
/// Every row datum must be a jsonb value that stays valid during the call.
pub(super) unsafe fn page(
    rows: impl Iterator<Item = Option<pg_sys::Datum>>,
    tail: &PageTail,
) -> pg_sys::Datum {
    let mut builder = Builder(ptr::null_mut());
    unsafe {
        builder.push(Token::WJB_BEGIN_OBJECT, None);
        builder.key("data");
        builder.push(Token::WJB_BEGIN_ARRAY, None);
        for row in rows {
            let mut value = match row {
                Some(datum) => contents_of(datum),
                None => scalar(jbvType::jbvNull),
            };
            builder.push(Token::WJB_ELEM, Some(&mut value));
        }
        builder.push(Token::WJB_END_ARRAY, None);
        builder.key("page_size");
        let mut numeric = scalar(jbvType::jbvNumeric);
        // int4_numeric rather than int64_to_numeric, which PostgreSQL 13 does not export.
        let page_size =
            pgrx::direct_function_call_as_datum(pg_sys::int4_numeric, &[tail.page_size.into_datum()]);
        numeric.val.numeric = page_size.expect("int4_numeric returns a value").cast_mut_ptr();
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

/// A jsonb datum as a value the builder unpacks into the page, token by token.
unsafe fn contents_of(datum: pg_sys::Datum) -> pg_sys::JsonbValue {
    unsafe {
        // The container needs the plain 4-byte header form (not short, not compressed).
        let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
        let mut value = scalar(jbvType::jbvBinary);
        value.val.binary.len = pgrx::varsize_any_exhdr(jsonb.cast()) as i32;
        value.val.binary.data = ptr::addr_of_mut!((*jsonb).root);
        value
    }
}
