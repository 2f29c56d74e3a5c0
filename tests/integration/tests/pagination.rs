//! keyset_page on a real cluster: paging returns exactly what ORDER BY returns, cursors cannot be
//! forged or reused elsewhere, input never reaches SQL text, row level security applies, and every
//! statement it runs can be served by a matching btree index; each row is exactly what to_jsonb makes.
//!
//! Cost: five clusters, about 11 s on 2 cores.

use postgres::Client;
use tenant_scale_harness::Cluster;

/// One page as the test reads it.
#[derive(Debug)]
struct Page {
    ids: Vec<i32>,
    has_next: bool,
    has_prev: bool,
    next_cursor: Option<String>,
    prev_cursor: Option<String>,
}

fn page(
    client: &mut Client,
    relation: &str,
    order_by: &[&str],
    page_size: i32,
    cursor: Option<&str>,
    filter: &str,
) -> Result<Page, postgres::Error> {
    let row = client.query_one(
        "SELECT ARRAY(SELECT (r.value->>'id')::int FROM jsonb_array_elements(p->'data') WITH ORDINALITY r
                      ORDER BY r.ordinality),
                (p->>'has_next')::boolean, (p->>'has_prev')::boolean, p->>'next_cursor', p->>'prev_cursor'
         FROM tenant_scale.keyset_page($1::text::regclass, $2::text[], $3, $4, $5::text::jsonb) AS p",
        &[&relation, &order_by, &page_size, &cursor, &filter],
    )?;
    Ok(Page {
        ids: row.get(0),
        has_next: row.get(1),
        has_prev: row.get(2),
        next_cursor: row.get(3),
        prev_cursor: row.get(4),
    })
}

fn message(error: &postgres::Error) -> String {
    error.as_db_error().map_or_else(|| error.to_string(), |db| db.message().to_string())
}

fn sqlstate(error: &postgres::Error) -> String {
    error.code().map(|code| code.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

/// Random rows with many duplicates and NULLs in every sortable column but the key.
fn fill_random_table(client: &mut Client, seed: u64, rows: i32) {
    client
        .batch_execute(
            "CREATE TABLE things (id int PRIMARY KEY, a int, b text, c int NOT NULL, company int NOT NULL)",
        )
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let words = ["apple", "Apple", "pear", "", "zebra"];
    for id in 1..=rows {
        let a: Option<i32> = if rng.u8(..4) == 0 { None } else { Some(rng.i32(-2..3)) };
        let b: Option<&str> = if rng.u8(..3) == 0 { None } else { Some(words[rng.usize(..words.len())]) };
        client
            .execute(
                "INSERT INTO things VALUES ($1, $2, $3, $4, $5)",
                &[&id, &a, &b, &rng.i32(0..3), &rng.i32(1..3)],
            )
            .unwrap();
    }
}

/// Walks the listing forward by next_cursor, then back from the last page by prev_cursor, and checks
/// both walks against the plain ORDER BY (tie-broken by id, as keyset_page does).
fn assert_walks_match_order_by(client: &mut Client, order_by: &[&str], filter: &str, page_size: i32) {
    let tie_break =
        if order_by.iter().any(|item| item.split_whitespace().next() == Some("id")) { "" } else { ", id" };
    let order_sql =
        if order_by.is_empty() { "id".to_string() } else { format!("{}{tie_break}", order_by.join(", ")) };
    let expected: Vec<i32> = client
        .query_one(
            &format!(
                "SELECT COALESCE(array_agg(id ORDER BY {order_sql}), '{{}}') FROM things
                 WHERE ($1::text::jsonb ->> 'company' IS NULL OR company = ($1::text::jsonb ->> 'company')::int)"
            ),
            &[&filter],
        )
        .unwrap()
        .get(0);
    let context = format!("order_by {order_by:?}, filter {filter}, page_size {page_size}");

    let mut forward: Vec<i32> = Vec::new();
    let mut pages = vec![page(client, "things", order_by, page_size, None, filter).unwrap()];
    loop {
        let current = pages.last().unwrap();
        assert_eq!(current.has_prev, pages.len() > 1, "{context}: has_prev of page {}", pages.len());
        assert!(current.ids.len() <= page_size as usize, "{context}");
        forward.extend(&current.ids);
        if !current.has_next {
            assert!(current.next_cursor.is_none(), "{context}");
            break;
        }
        assert!(pages.len() <= expected.len() + 1, "{context}: more pages than rows");
        let cursor = current.next_cursor.clone().expect("has_next comes with next_cursor");
        pages.push(page(client, "things", order_by, page_size, Some(&cursor), filter).unwrap());
    }
    assert_eq!(forward, expected, "{context}: forward walk");

    // Back from the last page reached going forward.
    let mut current = pages.pop().unwrap();
    let mut backward_pages = vec![current.ids.clone()];
    while let Some(prev) = current.prev_cursor.clone() {
        assert!(current.has_prev, "{context}");
        current = page(client, "things", order_by, page_size, Some(&prev), filter).unwrap();
        assert!(current.has_next, "{context}: a page before another has a next page");
        backward_pages.push(current.ids.clone());
        assert!(backward_pages.len() <= expected.len() + 1, "{context}: more pages than rows");
    }
    assert!(!current.has_prev, "{context}");
    let backward: Vec<i32> = backward_pages.into_iter().rev().flatten().collect();
    assert_eq!(backward, expected, "{context}: backward walk");
}

#[test]
fn walking_pages_both_ways_returns_exactly_the_order_by_rows_with_duplicates_and_nulls() {
    let cluster = Cluster::builder().start().unwrap();
    let mut client = cluster.connect().unwrap();
    fill_random_table(&mut client, 0x7e5e_ed05, 120);
    let orders: [&[&str]; 9] = [
        &[],
        &["a"],
        &["a desc"],
        &["a nulls first", "b desc"],
        &["b desc nulls last", "a asc nulls first"],
        &["c desc", "a", "b"],
        &["c", "id desc"],
        &["a desc nulls last", "c", "b nulls first"],
        &["b desc", "c desc", "a nulls first"],
    ];
    for order_by in orders {
        for page_size in [1, 7, 100] {
            assert_walks_match_order_by(&mut client, order_by, "{}", page_size);
        }
    }
    for page_size in [1, 7, 100] {
        assert_walks_match_order_by(
            &mut client,
            &["b nulls first", "a desc"],
            r#"{"company": 2}"#,
            page_size,
        );
    }
}

/// keyset_page converts the common types itself and leaves the others to to_jsonb (see
/// src/pagination/jsonb.rs): either way each row must be exactly, as text, the object to_jsonb makes.
#[test]
fn rows_of_every_kind_of_column_are_exactly_what_to_jsonb_makes() {
    let cluster = Cluster::builder().start().unwrap();
    let mut client = cluster.connect().unwrap();
    client
        .batch_execute(
            r#"CREATE DOMAIN positive AS int CHECK (VALUE > 0);
               CREATE TYPE pair AS (x int, y text);
               CREATE TABLE typed (
                   id int PRIMARY KEY, gone int, small int2, big int8, amount numeric, cut numeric(6, 2),
                   flag bool, note text, "Mixed Case" varchar(12), padded char(4), day date,
                   at timestamp, at_tz timestamptz, doc jsonb, raw json, ratio float8, tags int[],
                   count positive, ident uuid, span interval, both_parts pair,
                   twice int4 GENERATED ALWAYS AS (small * 2) STORED);
               ALTER TABLE typed DROP COLUMN gone;
               INSERT INTO typed (id) VALUES (1);
               INSERT INTO typed VALUES
                 (2, -32768, 9223372036854775807, 'NaN', 1.5, true, '', 'x', 'ab', '2024-02-29', '2024-01-01 00:00:00.000001',
                  '2024-06-01 12:00+02', '{"b": [1, {"c": null}], "a": "é"}', '{"b": 1, "a": 2, "a": 3}', 'NaN',
                  '{1,NULL,3}', 1, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 day 2 hours', ROW(1, 'one')),
                 (3, 32767, -9223372036854775808, 'Infinity', -0.01, false, 'quote " back \ tab	é 😀', 'Ünïcode', NULL,
                  'infinity', '-infinity', 'infinity', '"just a string"', '[1, 2]', 'Infinity', '{}', 2, NULL,
                  '-1 month', ROW(NULL, NULL)),
                 (4, 0, 0, '-Infinity', 0, NULL, repeat('long ', 2000), NULL, 'abcd', '-infinity', NULL, '-infinity',
                  '12.50', 'null', 1e300, NULL, NULL, NULL, NULL, NULL),
                 (5, 1, 1, '12345678901234567890.000000000000000001', 1234.56, true, NULL, '', NULL, '0001-01-01 BC',
                  '2000-01-01', '1999-12-31 23:59:59.999999+00', 'null', NULL, 0.1, '{{1,2},{3,4}}', NULL, NULL, NULL,
                  NULL);
               SET TIME ZONE 'America/New_York';"#,
        )
        .unwrap();
    let (page, expected): (String, String) = client
        .query_one(
            "SELECT (tenant_scale.keyset_page('typed', ARRAY['id'], 100) -> 'data')::text,
                    (SELECT jsonb_agg(to_jsonb(t) ORDER BY id) FROM typed t)::text",
            &[],
        )
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(page, expected);
    assert!(page.contains(r#""amount": "NaN""#) && page.contains(r#""cut": 1.50"#), "{page}");
}

#[test]
fn tampered_foreign_and_injected_arguments_get_22023_and_never_other_rows() {
    let cluster = Cluster::builder().start().unwrap();
    let mut client = cluster.connect().unwrap();
    fill_random_table(&mut client, 42, 30);
    client.batch_execute("CREATE TABLE others (id int PRIMARY KEY, a int); INSERT INTO others SELECT g, g FROM generate_series(1, 30) g").unwrap();
    let first = page(&mut client, "things", &["a"], 5, None, "{}").unwrap();
    let cursor = first.next_cursor.clone().unwrap();
    assert!(page(&mut client, "things", &["a"], 5, Some(&cursor), "{}").is_ok());

    // Every single-character change of a cursor is refused.
    for position in 0..cursor.len() {
        let mut altered = cursor.clone().into_bytes();
        altered[position] = if altered[position] == b'x' { b'y' } else { b'x' };
        let altered = String::from_utf8(altered).unwrap();
        let error = page(&mut client, "things", &["a"], 5, Some(&altered), "{}").unwrap_err();
        assert_eq!(sqlstate(&error), "22023", "cursor altered at {position}: {error:?}");
    }
    // A valid cursor used for another listing.
    let foreign = [
        ("others", &["a"][..], "{}"),
        ("things", &["a desc"][..], "{}"),
        ("things", &["a", "b"][..], "{}"),
        ("things", &["a"][..], r#"{"company": 1}"#),
    ];
    for (relation, order_by, filter) in foreign {
        let error = page(&mut client, relation, order_by, 5, Some(&cursor), filter).unwrap_err();
        assert_eq!(sqlstate(&error), "22023", "{relation} {order_by:?} {filter}");
        assert!(message(&error).contains("cursor"), "{error}");
    }
    // After another session rotates the secret, this session (which cached the old one) refuses old
    // cursors too, and so does a page limit set by another session apply here at once.
    let mut admin = cluster.connect().unwrap();
    admin.batch_execute("SELECT tenant_scale.rotate_cursor_secret()").unwrap();
    assert_eq!(sqlstate(&page(&mut client, "things", &["a"], 5, Some(&cursor), "{}").unwrap_err()), "22023");
    admin.batch_execute("INSERT INTO tenant_scale.page_limits VALUES ('things', 4)").unwrap();
    assert_eq!(sqlstate(&page(&mut client, "things", &["a"], 5, None, "{}").unwrap_err()), "22023");
    admin.batch_execute("TRUNCATE tenant_scale.page_limits").unwrap();
    assert!(page(&mut client, "things", &["a"], 5, None, "{}").is_ok());

    // Injection attempts in order_by and filter keys are unknown columns or bad syntax, named.
    let injected_orders: [&[&str]; 5] = [
        &["id; DROP TABLE things"],
        &["id desc; DROP TABLE things --"],
        &["\"id\"\"; DROP TABLE things; --\""],
        &["(SELECT 1)"],
        &["a nulls first, id"],
    ];
    for order_by in injected_orders {
        let error = page(&mut client, "things", order_by, 5, None, "{}").unwrap_err();
        assert_eq!(sqlstate(&error), "22023", "{order_by:?}");
        assert!(message(&error).contains("order_by"), "{error}");
    }
    for filter in [r#"{"id = 1 OR true --": 1}"#, r#"{"\"id\"": 1}"#, r#"[1]"#, r#""id""#] {
        let error = page(&mut client, "things", &["a"], 5, None, filter).unwrap_err();
        assert_eq!(sqlstate(&error), "22023", "{filter}");
        assert!(message(&error).contains("filter"), "{error}");
    }
    // Values are bound: a quote-laden value matches nothing instead of everything.
    let injected_value = page(&mut client, "things", &["a"], 5, None, r#"{"b": "x' OR '1'='1"}"#).unwrap();
    assert!(injected_value.ids.is_empty());
    let bad_value = page(&mut client, "things", &["a"], 5, None, r#"{"a": "1 OR 1=1"}"#).unwrap_err();
    assert_eq!(sqlstate(&bad_value), "22023");
    for page_size in [0, -1, 101] {
        let error = page(&mut client, "things", &["a"], page_size, None, "{}").unwrap_err();
        assert_eq!(sqlstate(&error), "22023");
        assert!(message(&error).contains("page_size"), "{error}");
    }
    let count: i64 = client.query_one("SELECT count(*) FROM things", &[]).unwrap().get(0);
    assert_eq!(count, 30, "the table survived");
}

#[test]
fn row_level_security_and_privileges_apply_because_it_runs_as_the_caller() {
    let cluster = Cluster::builder().start().unwrap();
    let mut admin = cluster.connect().unwrap();
    fill_random_table(&mut admin, 7, 40);
    admin
        .batch_execute(
            "CREATE ROLE tenant_app LOGIN;
             GRANT USAGE ON SCHEMA tenant_scale TO tenant_app;
             GRANT SELECT ON things TO tenant_app;
             ALTER TABLE things ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own_company ON things USING (company = current_setting('app.company')::int);
             CREATE TABLE secrets (id int PRIMARY KEY);",
        )
        .unwrap();
    let mut app =
        Client::connect(&cluster.connstr().replace("user=postgres", "user=tenant_app"), postgres::NoTls)
            .unwrap();
    app.batch_execute("SET app.company = 2").unwrap();
    let visible: Vec<i32> = admin
        .query_one("SELECT array_agg(id ORDER BY id) FROM things WHERE company = 2", &[])
        .unwrap()
        .get(0);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let current = page(&mut app, "things", &[], 7, cursor.as_deref(), "{}").unwrap();
        seen.extend(current.ids);
        match current.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, visible, "only the policy's rows, all of them");
    let denied = page(&mut app, "secrets", &[], 7, None, "{}").unwrap_err();
    assert_eq!(sqlstate(&denied), "42501", "no SELECT privilege, no rows");
    let secret = app.query_one("SELECT secret FROM tenant_scale.cursor_secret", &[]).unwrap_err();
    assert_eq!(sqlstate(&secret), "42501", "the cursor key is not readable");
}

/// Plans of every statement keyset_page runs for the page after `cursor`.
fn plans(client: &mut Client, order_by: &[&str], cursor: Option<&str>) -> String {
    client
        .query(
            "SELECT line FROM tenant_scale.keyset_page_explain('paged', $1::text[], 20, $2) AS line",
            &[&order_by, &cursor],
        )
        .unwrap()
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn seek_statements_are_ordered_btree_index_scans_in_both_forms() {
    let cluster = Cluster::builder().start().unwrap();
    let mut client = cluster.connect().unwrap();
    client
        .batch_execute(
            "CREATE TABLE paged (id int PRIMARY KEY, score int NOT NULL, rank int, payload text);
             INSERT INTO paged SELECT g, g % 997, CASE WHEN g % 10 = 0 THEN NULL ELSE g % 503 END, md5(g::text)
             FROM generate_series(1, 50000) g;
             CREATE INDEX paged_score_id ON paged (score, id);
             CREATE INDEX paged_score_desc_id ON paged (score DESC, id);
             CREATE INDEX paged_rank_nulls_first_id ON paged (rank NULLS FIRST, id DESC);
             ANALYZE paged;",
        )
        .unwrap();
    let cases: [(&[&str], &str, &str); 3] = [
        // One direction, NOT NULL columns: the row-value form.
        (&["score"], "paged_score_id", "ROW(score, id) > ROW("),
        // Mixed directions: the expanded form.
        (&["score desc"], "paged_score_desc_id", "score < "),
        // A nullable key with NULLS FIRST and a descending tie-breaker.
        (&["rank nulls first", "id desc"], "paged_rank_nulls_first_id", "rank IS NOT NULL"),
    ];
    for (order_by, index, seek) in cases {
        // Deep into the listing, so that a plan reading from the start would show.
        let mut cursor = None;
        for _ in 0..3 {
            let current = page(&mut client, "paged", order_by, 100, cursor.as_deref(), "{}").unwrap();
            cursor = current.next_cursor;
        }
        let first = plans(&mut client, order_by, None);
        let after = plans(&mut client, order_by, cursor.as_deref());
        for plan in [&first, &after] {
            assert!(
                plan.contains(&format!("Index Scan using {index}")),
                "{order_by:?} does not use {index}:\n{plan}"
            );
            assert!(!plan.contains("Sort"), "{order_by:?} sorts:\n{plan}");
            assert!(!plan.contains("Seq Scan"), "{order_by:?} scans the table:\n{plan}");
        }
        assert!(after.contains(seek), "{order_by:?}: expected {seek:?} in\n{after}");
        assert!(after.contains("Index Cond"), "{order_by:?}: the seek is an index condition:\n{after}");
    }
    // For the nullable key: the cursor key is NULL (NULLs sort first): the rest of the NULL group, then
    // the non-NULL values, each an index scan.
    let null_key = page(&mut client, "paged", &["rank nulls first", "id desc"], 10, None, "{}").unwrap();
    let after_null = plans(&mut client, &["rank nulls first", "id desc"], null_key.next_cursor.as_deref());
    assert_eq!(after_null.matches("Index Scan using paged_rank_nulls_first_id").count(), 2, "{after_null}");
    assert!(after_null.contains("rank IS NULL") && after_null.contains("rank IS NOT NULL"), "{after_null}");
}
