//! Keyset (seek) pagination: `tenant_scale.keyset_page(relation, order_by, page_size, cursor, filter)`.
//!
//! OFFSET reads and throws away every skipped row; a seek query starts at the last row seen and reads
//! only the page, through a btree index that matches the order. `keyset_page` writes that query for
//! any relation with a primary key (or a unique NOT NULL key in `order_by`):
//!
//! - It runs as the caller (SECURITY INVOKER, no elevated rights), so table privileges and row level
//!   security apply to every row it returns. The one exception is reading the extension's own
//!   settings (the cursor secret and the per-relation page limit), which happens as the extension's
//!   owner in a fixed query, never with caller input in the text (settings.rs).
//! - Nothing the caller passes reaches SQL text: columns are matched against the catalog and the
//!   catalog's names are quoted; operators are the column types' btree operators, schema-qualified;
//!   filter values and cursor keys are bound parameters of the column's type (query.rs).
//! - The order is always total (the primary key is appended unless the order is already unique), so
//!   a cursor identifies exactly one position, and NULLs are placed exactly as ORDER BY places them.
//! - Cursors are opaque, versioned and authenticated (cursor.rs): they only continue the listing
//!   (relation, order, filter) they were made for, and an altered one is refused with SQLSTATE 22023.
//! - All statements of one call read one snapshot (the function is STABLE).
//!
//! Prepared plans are kept per backend, keyed by statement text and parameter types (`PLANS`): the
//! text changes with anything that changes the statement (relation name, columns, directions, which
//! keys are NULL, page size), and PostgreSQL's plan cache revalidates a kept plan after DDL.

mod catalog;
mod cursor;
mod jsonb;
mod order;
mod query;
mod settings;

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, JsonB, PgMemoryContexts, PgRelation};
use rustc_hash::{FxBuildHasher, FxHashMap};
use serde_json::{Map, Value};

use catalog::{Column, TypeSupport};
use cursor::{Cursor, CursorError, Direction, Fingerprint};
use order::{OrderError, OrderItem};
use query::{FilterTerm, Listing, SortKey};

use crate::backend_local::BackendLocal;

static MAX_PAGE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(100);

/// Kept plans, bounded: a backend that pages through many shapes starts over rather than grow.
const MAX_KEPT_PLANS: usize = 256;

/// Statement text and parameter types.
type PlanKey = (String, Vec<pg_sys::Oid>);

static PLANS: BackendLocal<RefCell<FxHashMap<PlanKey, Rc<OwnedPreparedStatement>>>> =
    BackendLocal::new(RefCell::new(FxHashMap::with_hasher(FxBuildHasher)));

pgrx::extension_sql_file!(
    "../../sql/pagination.sql",
    name = "pagination",
    requires = [keyset_page, keyset_page_explain, settings::pagination_settings_changed]
);

pub(crate) fn register_gucs() {
    GucRegistry::define_int_guc(
        c"tenant_scale.max_page_size",
        c"Largest page_size keyset_page accepts for a relation without its own limit.",
        c"A relation listed in tenant_scale.page_limits uses its max_page_size instead. Only superusers \
          (or ALTER ROLE/DATABASE ... SET by one) can change it, so that an application cannot lift the \
          limit for itself.",
        &MAX_PAGE_SIZE,
        1,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// A page of `relation` in the order `order_by`, as jsonb:
/// `{"data": [...], "page_size": n, "has_next": b, "has_prev": b, "next_cursor": t, "prev_cursor": t}`.
#[pg_extern(stable)]
fn keyset_page(
    relation: Option<PgRelation>,
    order_by: Option<Vec<Option<String>>>,
    page_size: default!(Option<i32>, 20),
    cursor: default!(Option<&str>, "NULL"),
    filter: default!(Option<JsonB>, "'{}'"),
) -> JsonbDatum {
    let request = Request::new(relation, order_by, page_size, cursor, filter);
    // SAFETY: reads the current memory context, this call's, which PostgreSQL keeps for the returned
    // value (SPI's own context ends with the connection).
    let call_memory = PgMemoryContexts::For(unsafe { pg_sys::CurrentMemoryContext });
    let page = Spi::connect(|client| request.page(client, call_memory))
        .unwrap_or_else(|error| pgrx::error!("tenant_scale: reading the page failed: {error}"));
    JsonbDatum(page)
}

/// A jsonb value built in the function's memory context, returned as it is.
pub(crate) struct JsonbDatum(pg_sys::Datum);

// SAFETY: the datum is a jsonb value allocated in the function's caller's memory context.
unsafe impl pgrx::callconv::BoxRet for JsonbDatum {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

pgrx::impl_sql_translatable!(JsonbDatum, "jsonb");

/// The plan of every statement `keyset_page` would run for these arguments, in the order it would
/// run them (EXPLAIN (COSTS OFF), with the values bound): to check that a listing uses an index.
/// VOLATILE because PostgreSQL runs EXPLAIN only from volatile functions.
#[pg_extern]
fn keyset_page_explain(
    relation: Option<PgRelation>,
    order_by: Option<Vec<Option<String>>>,
    page_size: default!(Option<i32>, 20),
    cursor: default!(Option<&str>, "NULL"),
    filter: default!(Option<JsonB>, "'{}'"),
) -> SetOfIterator<'static, String> {
    let request = Request::new(relation, order_by, page_size, cursor, filter);
    let scan = request.first_scan();
    let lines = Spi::connect_mut(|client| -> SpiResult<Vec<String>> {
        let mut lines = Vec::new();
        for sql in &scan.statements {
            let explain = format!("EXPLAIN (COSTS OFF) {sql}");
            // EXPLAIN is a utility statement, which SPI runs only outside read-only mode.
            for row in client.update(explain.as_str(), None, &scan.args())? {
                lines.push(row.get::<String>(1)?.unwrap_or_default());
            }
        }
        Ok(lines)
    })
    .unwrap_or_else(|error| pgrx::error!("tenant_scale: explaining the page failed: {error}"));
    SetOfIterator::new(lines)
}

/// The SQLSTATE 22023 error for a bad argument, named in the message.
pub(crate) struct Refusal(ErrorReport);

pub(crate) fn invalid(argument: &str, message: impl Into<String>) -> Refusal {
    Refusal(ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("invalid {argument}: {}", message.into()),
        "tenant_scale.keyset_page",
    ))
}

impl Refusal {
    pub fn detail(self, detail: impl Into<String>) -> Self {
        Refusal(self.0.set_detail(detail))
    }

    pub fn hint(self, hint: impl Into<String>) -> Self {
        Refusal(self.0.set_hint(hint))
    }

    pub fn raise(self) -> ! {
        self.0.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

/// A listing resolved against the catalogs: everything but the position.
struct ResolvedListing {
    relation_sql: String,
    /// The columns of the row objects, and the select list that reads them (see jsonb.rs).
    row_columns: Vec<jsonb::RowColumn>,
    row_sql: String,
    keys: Vec<SortKey>,
    key_columns: Vec<KeyColumn>,
    filter: Vec<FilterTerm>,
    filter_args: Vec<(pg_sys::Datum, pg_sys::Oid)>,
    fingerprint: Fingerprint,
}

/// How a sort key's values go in (cursor keys, as parameters) and out (into the next cursor).
struct KeyColumn {
    name: String,
    type_oid: pg_sys::Oid,
    typmod: i32,
    support: TypeSupport,
}

/// Validated arguments of one call.
struct Request {
    listing: ResolvedListing,
    page_size: usize,
    cursor: Option<Cursor>,
    secret: Vec<u8>,
}

/// Up to page_size + 1 rows in scan order, and the statements and arguments that fetch them.
struct Scan {
    forward: bool,
    row_width: usize,
    key_count: usize,
    statements: Vec<String>,
    args: Vec<(pg_sys::Datum, pg_sys::Oid)>,
}

/// A fetched row: its column values as the page statement reads them and its sort-key values (`None`
/// for NULL), which stay valid until the SPI connection that fetched them closes.
struct Row {
    data: Vec<Option<pg_sys::Datum>>,
    key: Vec<Option<pg_sys::Datum>>,
}

impl Request {
    fn new(
        relation: Option<PgRelation>,
        order_by: Option<Vec<Option<String>>>,
        page_size: Option<i32>,
        cursor: Option<&str>,
        filter: Option<JsonB>,
    ) -> Request {
        let relation = relation.unwrap_or_else(|| invalid("relation", "it must not be NULL").raise());
        let order_by = order_by.unwrap_or_else(|| {
            invalid("order_by", "it must not be NULL")
                .hint("Pass ARRAY[]::text[] to order by the primary key.")
                .raise()
        });
        let filter = filter.map_or_else(|| Value::Object(Map::new()), |filter| filter.0);
        let listing = ResolvedListing::new(&relation, &order_by, &filter);
        let (secret, relation_limit) = settings::for_relation(relation.oid());
        let page_size = checked_page_size(page_size, relation_limit, &relation);
        let cursor = cursor.map(|text| {
            let decoded = Cursor::decode(text, &secret, &listing.fingerprint).and_then(|cursor| {
                if cursor.key.len() == listing.keys.len() { Ok(cursor) } else { Err(CursorError::Malformed) }
            });
            decoded.unwrap_or_else(|error| {
                invalid("cursor", "it does not continue this listing")
                    .detail(error.detail())
                    .hint(
                        "A cursor is only valid with the relation, order_by and filter that produced it; \
                         start again from the first page with cursor => NULL.",
                    )
                    .raise()
            })
        });
        Request { listing, page_size, cursor, secret }
    }

    /// The scan the cursor asks for (or the first page).
    fn first_scan(&self) -> Scan {
        match &self.cursor {
            None => self.listing.scan(true, None, self.page_size),
            Some(cursor) => {
                self.listing.scan(cursor.direction == Direction::After, Some(&cursor.key), self.page_size)
            }
        }
    }

    /// The page as jsonb, allocated in `memory` (see jsonb.rs).
    fn page(&self, client: &SpiClient<'_>, mut memory: PgMemoryContexts) -> SpiResult<pg_sys::Datum> {
        let scan = self.first_scan();
        let mut rows = scan.run(client, self.page_size + 1)?;
        let (mut forward, mut from_cursor) = (scan.forward, self.cursor.is_some());
        if from_cursor && rows.is_empty() {
            // Everything past the cursor is gone (deleted since the cursor was made): the page at that
            // end of the listing is the closest thing that exists.
            let from_end = self.listing.scan(!forward, None, self.page_size);
            rows = from_end.run(client, self.page_size + 1)?;
            (forward, from_cursor) = (from_end.forward, false);
        }
        let more = rows.len() > self.page_size;
        rows.truncate(self.page_size);
        if !forward {
            rows.reverse();
        }
        let (has_next, has_prev) = if forward { (more, from_cursor) } else { (from_cursor, more) };
        let cursor_at = |direction, row: Option<&Row>| -> Option<String> {
            let row = row.filter(|_| if direction == Direction::After { has_next } else { has_prev })?;
            let key = row.key.iter().zip(&self.listing.key_columns);
            let key = key.map(|(value, column)| value.map(|datum| column.support.render(datum))).collect();
            Some(Cursor { direction, key }.encode(&self.secret, &self.listing.fingerprint))
        };
        let (next_cursor, prev_cursor) =
            (cursor_at(Direction::After, rows.last()), cursor_at(Direction::Before, rows.first()));
        let tail = jsonb::PageTail {
            // checked_page_size keeps it within an int4 limit.
            page_size: self.page_size as i32,
            has_next,
            has_prev,
            next_cursor: next_cursor.as_deref(),
            prev_cursor: prev_cursor.as_deref(),
        };
        // SAFETY: `memory` is the calling function's context, alive after the switch; the row datums are
        // values of tuples this SPI connection still holds, read by the statement for their forms.
        let columns = &self.listing.row_columns;
        Ok(unsafe {
            memory.switch_to(|_| jsonb::page(rows.iter().map(|row| row.data.as_slice()), columns, &tail))
        })
    }
}

fn checked_page_size(page_size: Option<i32>, relation_limit: Option<i32>, relation: &PgRelation) -> usize {
    let (limit, source) = match relation_limit {
        Some(limit) => (
            limit,
            format!("tenant_scale.page_limits allows at most {limit} rows per page of {}.", relation.name()),
        ),
        None => {
            let limit = MAX_PAGE_SIZE.get();
            (limit, format!("tenant_scale.max_page_size is {limit}."))
        }
    };
    match page_size {
        Some(size) if size >= 1 && size <= limit => size as usize,
        Some(size) => invalid("page_size", format!("{size} is outside 1..{limit}"))
            .detail(source)
            .hint("Ask for fewer rows and follow next_cursor for the rest.")
            .raise(),
        None => invalid("page_size", "it must not be NULL").raise(),
    }
}

impl ResolvedListing {
    fn new(relation: &PgRelation, order_by: &[Option<String>], filter: &Value) -> ResolvedListing {
        let relation_kind = relation.rd_rel;
        // SAFETY: rd_rel of an open relation is always valid.
        let kind = unsafe { (*relation_kind).relkind } as u8;
        if ![b'r', b'p', b'm', b'f'].contains(&kind) {
            invalid("relation", format!("\"{}\" is not a table or materialized view", relation.name()))
                .detail("keyset_page needs a primary key or unique index to make the order total.")
                .raise()
        }
        let columns = catalog::columns(relation);
        let find = |argument: &str, name: &str| -> &Column {
            columns.iter().find(|column| column.name == name).unwrap_or_else(|| {
                invalid(
                    argument,
                    format!("column \"{name}\" does not exist in relation \"{}\"", relation.name()),
                )
                .raise()
            })
        };
        let supported = |argument: &str, column: &Column| -> TypeSupport {
            catalog::type_support(column.type_oid).unwrap_or_else(|| {
                invalid(argument, format!("column \"{}\" has a type without a btree ordering", column.name))
                    .detail("Its type has no default btree operator class, so it can neither be sorted nor sought.")
                    .raise()
            })
        };

        let texts: Vec<&str> = order_by
            .iter()
            .map(|item| item.as_deref().unwrap_or_else(|| invalid("order_by", "an item is NULL").raise()))
            .collect();
        let mut items = order::parse_order(&texts).unwrap_or_else(|error: OrderError| {
            invalid("order_by", error.to_string())
                .hint("Each item is a column name, optionally followed by asc or desc and by nulls first or nulls last.")
                .raise()
        });
        for item in &items {
            find("order_by", &item.column);
        }
        append_tie_breaker(relation, &columns, &mut items);

        let mut keys = Vec::with_capacity(items.len());
        let mut key_columns = Vec::with_capacity(items.len());
        for item in items {
            let column = find("order_by", &item.column);
            let support = supported("order_by", column);
            let item = if column.not_null { item.without_null_placement() } else { item };
            keys.push(SortKey {
                ident: catalog::quote_ident(&column.name),
                item,
                not_null: column.not_null,
                less: support.less.clone(),
                greater: support.greater.clone(),
                equal: support.equal.clone(),
            });
            key_columns.push(KeyColumn {
                name: column.name.clone(),
                type_oid: column.type_oid,
                typmod: column.typmod,
                support,
            });
        }

        let Value::Object(entries) = filter else {
            invalid("filter", "it must be a JSON object of column names and values")
                .hint("For example '{\"company_id\": 42}'.")
                .raise()
        };
        let mut entries: Vec<(&String, &Value)> = entries.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let mut filter_terms = Vec::with_capacity(entries.len());
        let mut filter_args = Vec::with_capacity(entries.len());
        let mut canonical = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            let column = find("filter", name);
            let support = supported("filter", column);
            let text = json_scalar_text(value);
            let param = text.as_ref().map(|text| {
                filter_args.push((support.parse(text, column.typmod, "filter", name), column.type_oid));
                filter_args.len()
            });
            filter_terms.push(FilterTerm {
                ident: catalog::quote_ident(name),
                equal: support.equal.clone(),
                param,
            });
            canonical.push((name.clone(), text));
        }

        let order: Vec<OrderItem> = keys.iter().map(|key| key.item.clone()).collect();
        let fingerprint = cursor::fingerprint(relation.oid().to_u32(), &order, &canonical);
        let read_as_is: Vec<Option<jsonb::ValueForm>> =
            columns.iter().map(|column| jsonb::ValueForm::of_type(column.type_oid)).collect();
        let idents: Vec<String> = columns.iter().map(|column| catalog::quote_ident(&column.name)).collect();
        let row_sql = query::row_select_list(
            idents.iter().zip(&read_as_is).map(|(ident, form)| (ident.as_str(), form.is_none())),
        );
        let row_columns = columns
            .into_iter()
            .zip(read_as_is)
            .map(|(column, form)| jsonb::RowColumn {
                name: column.name,
                form: form.unwrap_or(jsonb::ValueForm::Jsonb),
            })
            .collect();
        ResolvedListing {
            relation_sql: catalog::qualified_name(relation),
            row_columns,
            row_sql,
            keys,
            key_columns,
            filter: filter_terms,
            filter_args,
            fingerprint,
        }
    }

    /// The statements for page_size + 1 rows from `key` (or from the start) in scan order: the
    /// listing's order when `forward`, else its reverse.
    fn scan(&self, forward: bool, key: Option<&[Option<String>]>, page_size: usize) -> Scan {
        let keys: Vec<SortKey> =
            if forward { self.keys.clone() } else { self.keys.iter().map(SortKey::reversed).collect() };
        let listing = Listing {
            relation: &self.relation_sql,
            row: &self.row_sql,
            keys: &keys,
            filter: &self.filter,
            limit: page_size + 1,
        };
        let mut args = self.filter_args.clone();
        let statements = match key {
            None => vec![listing.first_rows()],
            Some(values) => {
                let params: Vec<Option<usize>> = values
                    .iter()
                    .zip(&self.key_columns)
                    .map(|(value, column)| {
                        value.as_ref().map(|text| {
                            let datum = column.support.parse(text, column.typmod, "cursor", &column.name);
                            args.push((datum, column.type_oid));
                            args.len()
                        })
                    })
                    .collect();
                listing.after_key(&params)
            }
        };
        Scan { forward, row_width: self.row_columns.len(), key_count: self.keys.len(), statements, args }
    }
}

/// Appends the primary key columns (ascending) unless the order already contains a unique key.
fn append_tie_breaker(relation: &PgRelation, columns: &[Column], items: &mut Vec<OrderItem>) {
    let (primary, unique) = catalog::unique_keys(relation, columns);
    let named =
        |attnum: &i16| columns.iter().find(|column| column.attnum == *attnum).map(|c| c.name.as_str());
    let covered = |key: &Vec<i16>| {
        key.iter()
            .all(|attnum| named(attnum).is_some_and(|name| items.iter().any(|item| item.column == name)))
    };
    if primary.iter().chain(unique.iter()).any(covered) {
        return;
    }
    let Some(primary) = primary else {
        invalid("order_by", format!("the order is not unique and \"{}\" has no primary key", relation.name()))
            .detail("Keyset pagination needs a total order: rows that tie on every order_by column could be skipped or repeated.")
            .hint("Add a primary key to the relation, or end order_by with the columns of a unique index on NOT NULL columns.")
            .raise()
    };
    for attnum in &primary {
        if let Some(name) = named(attnum)
            && !items.iter().any(|item| item.column == name)
        {
            items.push(OrderItem::ascending(name));
        }
    }
}

/// A filter value as the text the column type's input function reads; `None` for JSON null.
fn json_scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Number(number) => Some(number.to_string()),
        // json and jsonb columns can be compared with a whole document.
        Value::Array(_) | Value::Object(_) => Some(value.to_string()),
    }
}

impl Scan {
    fn args(&self) -> Vec<DatumWithOid<'static>> {
        self.args
            .iter()
            // SAFETY: each datum was made by the input function of the type it is paired with, in
            // this call's memory context, which outlives the statements.
            .map(|(datum, oid)| unsafe { DatumWithOid::new(*datum, *oid) })
            .collect()
    }

    fn types(&self) -> Vec<pg_sys::Oid> {
        self.args.iter().map(|(_, oid)| *oid).collect()
    }

    /// Runs the statements in order until `wanted` rows are in.
    fn run(&self, client: &SpiClient<'_>, wanted: usize) -> SpiResult<Vec<Row>> {
        let args = self.args();
        let types = self.types();
        let mut rows = Vec::with_capacity(wanted);
        for sql in &self.statements {
            let missing = wanted - rows.len();
            if missing == 0 {
                break;
            }
            let plan = kept_plan(client, sql, &types)?;
            let fetched = client.select(&*plan, Some(missing as i64), &args)?.len();
            if fetched == 0 {
                continue;
            }
            // Each row's values are read in one heap_deform_tuple call: pgrx's row iterator makes two
            // guarded calls per value and its accessors a third, a third of a page's cost.
            // SAFETY: `select` has just left its `fetched` rows in SPI_tuptable, whose tuples stay
            // allocated until the SPI connection closes (later statements do not free them).
            unsafe {
                let table = pg_sys::SPI_tuptable;
                let width = self.row_width + self.key_count;
                // heap_deform_tuple fills one slot per column of the result, which the statement
                // made `width` wide; sized by the descriptor all the same.
                let columns = usize::try_from((*(*table).tupdesc).natts).unwrap_or(0).max(width);
                let mut values = vec![pg_sys::Datum::from(0); columns];
                let mut nulls = vec![true; columns];
                for &tuple in std::slice::from_raw_parts((*table).vals, fetched) {
                    pg_sys::heap_deform_tuple(
                        tuple,
                        (*table).tupdesc,
                        values.as_mut_ptr(),
                        nulls.as_mut_ptr(),
                    );
                    let value = |index: usize| (!nulls[index]).then_some(values[index]);
                    rows.push(Row {
                        data: (0..self.row_width).map(value).collect(),
                        key: (self.row_width..width).map(value).collect(),
                    });
                }
            }
        }
        Ok(rows)
    }
}

/// The kept plan for `sql` with parameters of `types`, prepared on first use.
fn kept_plan(
    client: &SpiClient<'_>,
    sql: &str,
    types: &[pg_sys::Oid],
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let cache_key = (sql.to_string(), types.to_vec());
    if let Some(plan) = PLANS.with(|plans| plans.borrow().get(&cache_key).cloned()) {
        return Ok(plan);
    }
    let oids: Vec<PgOid> = types.iter().map(|oid| PgOid::from(*oid)).collect();
    let plan = Rc::new(client.prepare(sql, &oids)?.keep());
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if plans.len() >= MAX_KEPT_PLANS {
            plans.clear();
        }
        plans.insert(cache_key, plan.clone());
    });
    Ok(plan)
}
