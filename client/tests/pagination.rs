//! Typed pages from the extension's keyset_page() on a real cluster.

use serde::Deserialize;
use serde_json::json;
use tenant_scale_client::pagination::{Page, PageError, PageRequest};
use tenant_scale_client::pool::{Error, PoolConfig, TenantPool};
use tenant_scale_harness::Cluster;
use tokio_postgres::error::SqlState;

#[derive(Debug, Deserialize, PartialEq)]
struct Item {
    id: i32,
    name: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_one_company_forward_and_back_in_order() {
    let primary = Cluster::builder().start().unwrap();
    primary
        .psql(
            "CREATE TABLE items (id int PRIMARY KEY, company_id text NOT NULL, name text); \
             INSERT INTO items SELECT i, CASE WHEN i % 3 = 0 THEN 'globex' ELSE 'acme' END, \
               CASE WHEN i % 4 = 0 THEN NULL ELSE 'item ' || (i % 5) END FROM generate_series(1, 20) i",
        )
        .unwrap();
    let expected: Vec<i32> = primary
        .psql("SELECT id FROM items WHERE company_id = 'acme' ORDER BY name DESC NULLS LAST, id")
        .unwrap()
        .lines()
        .map(|id| id.parse().unwrap())
        .collect();
    let pool = TenantPool::connect(PoolConfig::new(&primary.url()).unwrap()).await.unwrap();
    let connection = pool.read(Some("acme")).await.unwrap();
    let request = PageRequest {
        relation: "items",
        order_by: &["name desc nulls last"],
        page_size: 4,
        filter: json!({"company_id": "acme"}),
    };

    let (mut forward, mut cursor) = (Vec::new(), None);
    let last = loop {
        let page: Page<Item> = Page::fetch(&connection, &request, cursor.as_deref()).await.unwrap();
        forward.extend(page.data.iter().map(|item| item.id));
        if !page.has_next {
            break page;
        }
        cursor = page.next_cursor.clone();
    };
    assert_eq!(forward, expected);

    let mut backward: Vec<i32> = Vec::new();
    let mut page = last;
    loop {
        backward.splice(0..0, page.data.iter().map(|item| item.id));
        if !page.has_prev {
            break;
        }
        page = Page::fetch(&connection, &request, page.prev_cursor.as_deref()).await.unwrap();
    }
    assert_eq!(backward, expected);

    let foreign = PageRequest { filter: json!({"company_id": "globex"}), ..request.clone() };
    let first: Page<Item> = Page::fetch(&connection, &request, None).await.unwrap();
    let refused = Page::<Item>::fetch(&connection, &foreign, first.next_cursor.as_deref()).await;
    // Refused by the extension as a bad argument, not failing some other way.
    let Err(PageError::Database(Error::Database { source, .. })) = &refused else {
        panic!("a cursor of another filter is refused by the server: {refused:?}")
    };
    assert_eq!(source.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{source:?}");
}
