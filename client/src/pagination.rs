//! Typed pages from the extension's `tenant_scale.keyset_page()`, so application code never writes seek
//! SQL: the extension builds the query, checks the cursor's fingerprint and returns JSON; this module
//! binds the arguments and deserialises the rows into `T`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::pool::{Error, TenantConnection};

const KEYSET_PAGE: &str =
    "SELECT tenant_scale.keyset_page($1::text::regclass, $2::text[], $3::int4, $4::text, $5::jsonb)";

/// One page of rows and the cursors around it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Page<T> {
    pub data: Vec<T>,
    pub page_size: i32,
    pub has_next: bool,
    pub has_prev: bool,
    /// Pass to `fetch` for the page after this one.
    pub next_cursor: Option<String>,
    /// Pass to `fetch` for the page before this one.
    pub prev_cursor: Option<String>,
}

/// What to page through: a relation, its order and an equality filter.
#[derive(Clone, Debug, PartialEq)]
pub struct PageRequest<'a> {
    /// Relation name as `regclass` reads it (`patients`, `app.patients`).
    pub relation: &'a str,
    /// `column`, `column desc`, optionally `nulls first|last`; the primary key breaks ties.
    pub order_by: &'a [&'a str],
    pub page_size: i32,
    /// Equality on columns, e.g. `{"company_id": "acme"}`.
    pub filter: serde_json::Value,
}

impl<T: DeserializeOwned> Page<T> {
    /// The page at `cursor` (the first page when `None`). A cursor from another relation, order or
    /// filter is refused by the extension (SQLSTATE 22023).
    pub async fn fetch(
        connection: &TenantConnection,
        request: &PageRequest<'_>,
        cursor: Option<&str>,
    ) -> Result<Page<T>, PageError> {
        let order_by: Vec<&str> = request.order_by.to_vec();
        let row = connection
            .query_one(
                KEYSET_PAGE,
                &[&request.relation, &order_by, &request.page_size, &cursor, &request.filter],
            )
            .await?;
        let page: serde_json::Value = row.get(0);
        serde_json::from_value(page).map_err(PageError::Decode)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    #[error(transparent)]
    Database(#[from] Error),
    #[error("keyset_page() returned rows that do not deserialise: {0}")]
    Decode(serde_json::Error),
}
