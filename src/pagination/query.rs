//! The SQL text `keyset_page` runs. Pure Rust, no backend needed.
//!
//! Everything that reaches the text is either fixed here, an identifier or operator the caller took
//! from the catalogs and quoted, or a number; values (filter values, cursor keys) are always
//! parameters `$n`, bound with the column's own type.
//!
//! Two seek forms, both written so that a btree index matching the ORDER BY serves them as an ordered
//! range scan that stops after the page:
//!
//! - row-value form, `ROW(a, b) > ROW($1, $2)`, when every key sorts the same direction and no key
//!   column can hold NULL (a row comparison with a NULL inside is NULL, which would drop rows);
//! - expanded form otherwise: the rows after key `(k1, ..., kn)` are the disjoint union of the
//!   disjuncts `c1 = k1 AND ... AND c(i-1) = k(i-1) AND ci after ki` for i = n down to 1, where "after"
//!   follows the key's direction and NULL placement exactly as ORDER BY does (`ci > ki`, then
//!   `ci IS NULL` when NULLs sort last; `ci IS NOT NULL` after a NULL key when NULLs sort first;
//!   equality with a NULL key is `IS NULL`). A single `WHERE d1 OR d2 OR ...` cannot be an index
//!   range scan (btree cannot scan an OR in order), so each disjunct is its own statement and the
//!   caller runs them in this order until the page is full: concatenated, they are exactly the rows
//!   after the key in ORDER BY order, and each statement is an index range scan with an equality
//!   prefix.

use super::order::OrderItem;

/// Alias of the paged relation in every statement.
const ALIAS: &str = "keyset_row";

/// The select list of a row's columns (quoted identifiers, in order), each read as it is or, where
/// `by_to_jsonb`, converted by `to_jsonb` (see jsonb.rs).
pub(crate) fn row_select_list<'a>(columns: impl Iterator<Item = (&'a str, bool)>) -> String {
    let items: Vec<String> = columns
        .map(|(ident, by_to_jsonb)| {
            if by_to_jsonb {
                format!("pg_catalog.to_jsonb({ALIAS}.{ident})")
            } else {
                format!("{ALIAS}.{ident}")
            }
        })
        .collect();
    items.join(", ")
}

/// One sort key of the listing, resolved against the relation.
#[derive(Clone, Debug)]
pub(crate) struct SortKey {
    /// The column, as a quoted identifier.
    pub ident: String,
    pub item: OrderItem,
    pub not_null: bool,
    /// The btree operators of the column type's default operator class, as `OPERATOR(schema.op)`,
    /// so that the seek compares exactly as ORDER BY sorts, whatever the search_path.
    pub less: String,
    pub greater: String,
    pub equal: String,
}

impl SortKey {
    /// The same key, scanned the other way (walking backwards).
    pub fn reversed(&self) -> SortKey {
        SortKey { item: self.item.reversed(), ..self.clone() }
    }

    fn column(&self) -> String {
        format!("{ALIAS}.{}", self.ident)
    }

    /// `column = $p`, or `column IS NULL` for a NULL key.
    fn equal_to(&self, param: Option<usize>) -> String {
        match param {
            Some(param) => format!("{} {} ${param}", self.column(), self.equal),
            None => format!("{} IS NULL", self.column()),
        }
    }

    /// The conditions, in sort order, for "this column sorts after the key value".
    fn after(&self, param: Option<usize>) -> Vec<String> {
        let column = self.column();
        match param {
            Some(param) => {
                let operator = if self.item.descending { &self.less } else { &self.greater };
                let mut pieces = vec![format!("{column} {operator} ${param}")];
                if !self.item.nulls_first && !self.not_null {
                    pieces.push(format!("{column} IS NULL"));
                }
                pieces
            }
            None if self.item.nulls_first && !self.not_null => vec![format!("{column} IS NOT NULL")],
            None => Vec::new(),
        }
    }
}

/// An equality condition from `filter`: `param` is `None` for a JSON null (`IS NULL`).
#[derive(Clone, Debug)]
pub(crate) struct FilterTerm {
    pub ident: String,
    pub equal: String,
    pub param: Option<usize>,
}

/// What every statement of one page shares.
pub(crate) struct Listing<'a> {
    /// `schema.relation`, quoted.
    pub relation: &'a str,
    /// The row's select list (`row_select_list`).
    pub row: &'a str,
    /// Sort keys in scan order (reversed when walking backwards).
    pub keys: &'a [SortKey],
    pub filter: &'a [FilterTerm],
    pub limit: usize,
}

impl Listing<'_> {
    /// The first rows of the listing in scan order.
    pub fn first_rows(&self) -> String {
        self.statement(Vec::new())
    }

    /// Statements that, run in order and concatenated, return the rows after the key; `params[i]`
    /// is the parameter number holding key value i, `None` where the key value is NULL.
    pub fn after_key(&self, params: &[Option<usize>]) -> Vec<String> {
        debug_assert_eq!(params.len(), self.keys.len());
        if let Some(condition) = self.row_comparison(params) {
            return vec![self.statement(vec![condition])];
        }
        let mut statements = Vec::new();
        for position in (0..self.keys.len()).rev() {
            let prefix: Vec<String> =
                self.keys[..position].iter().zip(params).map(|(key, param)| key.equal_to(*param)).collect();
            for piece in self.keys[position].after(params[position]) {
                let mut conditions = prefix.clone();
                conditions.push(piece);
                statements.push(self.statement(conditions));
            }
        }
        statements
    }

    /// `ROW(a, b) > ROW($1, $2)` when it means exactly "after the key": one direction, no NULLs, and
    /// one operator spelling for every column.
    fn row_comparison(&self, params: &[Option<usize>]) -> Option<String> {
        let first = self.keys.first()?;
        let operator = if first.item.descending { &first.less } else { &first.greater };
        let uniform = self.keys.iter().all(|key| {
            key.not_null
                && key.item.descending == first.item.descending
                && (if key.item.descending { &key.less } else { &key.greater }) == operator
        });
        let params: Option<Vec<usize>> = params.iter().copied().collect();
        let params = params.filter(|_| uniform && self.keys.len() > 1)?;
        let columns: Vec<String> = self.keys.iter().map(SortKey::column).collect();
        let values: Vec<String> = params.iter().map(|param| format!("${param}")).collect();
        Some(format!("ROW({}) {operator} ROW({})", columns.join(", "), values.join(", ")))
    }

    fn statement(&self, seek: Vec<String>) -> String {
        let mut conditions: Vec<String> = self
            .filter
            .iter()
            .map(|term| match term.param {
                Some(param) => format!("{ALIAS}.{} {} ${param}", term.ident, term.equal),
                None => format!("{ALIAS}.{} IS NULL", term.ident),
            })
            .collect();
        conditions.extend(seek);
        let keys: Vec<String> = self.keys.iter().map(SortKey::column).collect();
        let order: Vec<String> =
            self.keys.iter().map(|key| format!("{} {}", key.column(), key.item.direction_sql())).collect();
        let mut sql = format!("SELECT {}, {} FROM {} AS {ALIAS}", self.row, keys.join(", "), self.relation);
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY {} LIMIT {}", order.join(", "), self.limit));
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, descending: bool, nulls_first: bool, not_null: bool) -> SortKey {
        SortKey {
            ident: name.to_string(),
            item: OrderItem { column: name.to_string(), descending, nulls_first },
            not_null,
            less: "<".to_string(),
            greater: ">".to_string(),
            equal: "=".to_string(),
        }
    }

    fn where_clauses(statements: &[String]) -> Vec<String> {
        statements
            .iter()
            .map(|sql| {
                let start = sql.find(" WHERE ").map_or(sql.len(), |at| at + 7);
                let end = sql.find(" ORDER BY ").unwrap();
                sql[start.min(end)..end].replace("keyset_row.", "")
            })
            .collect()
    }

    #[test]
    fn one_direction_without_nulls_seeks_with_a_row_comparison() {
        let keys = [key("a", true, true, true), key("id", true, true, true)];
        let filter = [FilterTerm { ident: "company".to_string(), equal: "=".to_string(), param: Some(1) }];
        let row = row_select_list([("id", false), ("\"Tags\"", true)].into_iter());
        let listing = Listing { relation: "public.t", row: &row, keys: &keys, filter: &filter, limit: 21 };
        let statements = listing.after_key(&[Some(2), Some(3)]);
        assert_eq!(
            statements,
            vec![
                "SELECT keyset_row.id, pg_catalog.to_jsonb(keyset_row.\"Tags\"), keyset_row.a, keyset_row.id \
                 FROM public.t AS keyset_row \
                 WHERE keyset_row.company = $1 AND ROW(keyset_row.a, keyset_row.id) < ROW($2, $3) \
                 ORDER BY keyset_row.a DESC NULLS FIRST, keyset_row.id DESC NULLS FIRST LIMIT 21"
                    .to_string()
            ]
        );
    }

    #[test]
    fn mixed_directions_expand_into_ordered_disjuncts() {
        let keys = [key("a", false, false, true), key("id", true, true, true)];
        let listing = Listing { relation: "t", row: "keyset_row.id", keys: &keys, filter: &[], limit: 8 };
        assert_eq!(where_clauses(&listing.after_key(&[Some(1), Some(2)])), ["a = $1 AND id < $2", "a > $1"]);
    }

    #[test]
    fn nullable_keys_place_nulls_exactly_as_order_by_does() {
        // a ASC NULLS LAST (nullable), b DESC NULLS FIRST (nullable), id ASC (not null).
        let keys =
            [key("a", false, false, false), key("b", true, true, false), key("id", false, false, true)];
        let listing = Listing { relation: "t", row: "keyset_row.id", keys: &keys, filter: &[], limit: 8 };
        assert_eq!(
            where_clauses(&listing.after_key(&[Some(1), Some(2), Some(3)])),
            ["a = $1 AND b = $2 AND id > $3", "a = $1 AND b < $2", "a > $1", "a IS NULL"]
        );
        // With NULL keys: equality becomes IS NULL; after a NULL that sorts first come the non-NULLs;
        // nothing sorts after a NULL that sorts last.
        assert_eq!(
            where_clauses(&listing.after_key(&[None, None, Some(3)])),
            ["a IS NULL AND b IS NULL AND id > $3", "a IS NULL AND b IS NOT NULL"]
        );
    }

    #[test]
    fn walking_backwards_reverses_directions_and_null_placement() {
        let keys: Vec<SortKey> = [key("a", false, false, false), key("id", false, false, true)]
            .iter()
            .map(SortKey::reversed)
            .collect();
        let listing = Listing { relation: "t", row: "keyset_row.id", keys: &keys, filter: &[], limit: 8 };
        let statements = listing.after_key(&[Some(1), Some(2)]);
        assert_eq!(where_clauses(&statements), ["a = $1 AND id < $2", "a < $1"]);
        assert!(
            statements[0]
                .ends_with("ORDER BY keyset_row.a DESC NULLS FIRST, keyset_row.id DESC NULLS FIRST LIMIT 8")
        );
        // From a NULL key (the start of the backward scan): first the rest of the NULL group, then all
        // non-NULL values.
        assert_eq!(
            where_clauses(&listing.after_key(&[None, Some(2)])),
            ["a IS NULL AND id < $2", "a IS NOT NULL"]
        );
    }

    #[test]
    fn the_first_page_has_only_the_filter() {
        let keys = [key("id", false, false, true)];
        let filter = [
            FilterTerm { ident: "company".to_string(), equal: "=".to_string(), param: Some(1) },
            FilterTerm { ident: "deleted_at".to_string(), equal: "=".to_string(), param: None },
        ];
        let listing = Listing { relation: "t", row: "keyset_row.id", keys: &keys, filter: &filter, limit: 3 };
        assert_eq!(where_clauses(&[listing.first_rows()]), ["company = $1 AND deleted_at IS NULL"]);
        let unfiltered = Listing { relation: "t", row: "keyset_row.id", keys: &keys, filter: &[], limit: 3 };
        assert!(!unfiltered.first_rows().contains("WHERE"));
    }
}
