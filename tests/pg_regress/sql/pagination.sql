-- keyset_page(relation, order_by, page_size => 20, cursor => NULL, filter => '{}'): one page of a
-- relation in any order, with cursors instead of OFFSET. Each page is a seek through an index, so the
-- 1000th page costs what the first one does.
-- Timestamps below are shown in UTC.
SET timezone = 'UTC';
CREATE TABLE orders (
    id int PRIMARY KEY,
    company_id int NOT NULL,
    customer text,
    total numeric(10, 2) NOT NULL,
    placed_at timestamptz NOT NULL
);
INSERT INTO orders VALUES
    (1, 1, 'ada',   12.50, '2024-03-01 09:00+00'),
    (2, 1, 'bob',    7.00, '2024-03-01 09:00+00'),
    (3, 2, 'cy',    99.99, '2024-03-01 10:00+00'),
    (4, 1, NULL,     3.10, '2024-03-02 08:30+00'),
    (5, 1, 'ada',  120.00, '2024-03-02 11:00+00'),
    (6, 2, 'dee',    8.25, '2024-03-03 12:00+00'),
    (7, 1, 'bob',   45.00, '2024-03-03 12:00+00'),
    (8, 1, NULL,     1.00, '2024-03-04 07:15+00');

-- The first page: rows as JSON objects, whether there are more, and the cursor to get them. Ties on
-- placed_at are broken by the primary key, which keyset_page appends to every order that is not unique.
SELECT jsonb_pretty(tenant_scale.keyset_page('orders', ARRAY['placed_at desc'], 2,
                                             filter => '{"company_id": 1}') - 'next_cursor')
       AS first_page;

-- Cursors are opaque text; follow next_cursor forward and prev_cursor back. A small helper shows
-- pages compactly for the rest of this session.
CREATE FUNCTION page_ids(page jsonb) RETURNS TABLE (ids text, has_prev boolean, has_next boolean)
LANGUAGE sql AS $$
    SELECT string_agg(row_data->>'id', ', ' ORDER BY position), (page->>'has_prev')::boolean,
           (page->>'has_next')::boolean
    FROM jsonb_array_elements(page->'data') WITH ORDINALITY AS rows(row_data, position)
$$;

SELECT tenant_scale.keyset_page('orders', ARRAY['customer nulls first', 'total desc'], 3) AS page \gset
SELECT * FROM page_ids(:'page');
SELECT tenant_scale.keyset_page('orders', ARRAY['customer nulls first', 'total desc'], 3,
                                :'page'::jsonb->>'next_cursor') AS page \gset
SELECT * FROM page_ids(:'page');
SELECT tenant_scale.keyset_page('orders', ARRAY['customer nulls first', 'total desc'], 3,
                                :'page'::jsonb->>'next_cursor') AS page \gset
SELECT * FROM page_ids(:'page');
-- ... and back.
SELECT tenant_scale.keyset_page('orders', ARRAY['customer nulls first', 'total desc'], 3,
                                :'page'::jsonb->>'prev_cursor') AS page \gset
SELECT * FROM page_ids(:'page');

-- order_by items are `column [asc|desc] [nulls first|last]`; quoted names keep their case. An empty
-- order_by pages by the primary key.
SELECT * FROM page_ids(tenant_scale.keyset_page('orders', ARRAY[]::text[], 5));

-- filter is equality on columns; each value is bound as a parameter of the column's type, and JSON
-- null means IS NULL.
SELECT * FROM page_ids(tenant_scale.keyset_page('orders', ARRAY['id'], 5, filter => '{"customer": null}'));
SELECT * FROM page_ids(tenant_scale.keyset_page('orders', ARRAY['id'], 5,
                                                filter => '{"company_id": 1, "customer": "ada"}'));
SELECT * FROM page_ids(tenant_scale.keyset_page('orders', ARRAY['id'], 5,
                                                filter => '{"customer": "ada'' OR ''1''=''1"}'));

-- page_size is 1 to tenant_scale.max_page_size (100 by default, superuser-only), or to the relation's
-- own limit in tenant_scale.page_limits.
SELECT name, setting, context, short_desc FROM pg_settings WHERE name = 'tenant_scale.max_page_size';
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 0);
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 101);
INSERT INTO tenant_scale.page_limits VALUES ('orders', 3);
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 4);
DELETE FROM tenant_scale.page_limits;

-- Bad arguments are SQLSTATE 22023, naming the argument; nothing the caller passes reaches SQL text.
SELECT tenant_scale.keyset_page('orders', ARRAY['shipped_at'], 5);
SELECT tenant_scale.keyset_page('orders', ARRAY['total sideways'], 5);
SELECT tenant_scale.keyset_page('orders', ARRAY['id; DROP TABLE orders'], 5);
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 5, filter => '{"id = 1 OR true": 1}');
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 5, filter => '{"total": "a lot"}');
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 5, filter => '[1, 2]');
SELECT tenant_scale.keyset_page(NULL, ARRAY['id']);

-- A cursor only continues the listing it came from: another order, filter or relation, an altered
-- cursor, or a cursor signed before rotate_cursor_secret() gets SQLSTATE 22023, never other rows.
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 2) ->> 'next_cursor' AS cursor \gset
SELECT * FROM page_ids(tenant_scale.keyset_page('orders', ARRAY['id'], 2, :'cursor'));
SELECT tenant_scale.keyset_page('orders', ARRAY['id desc'], 2, :'cursor');
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 2, :'cursor', '{"company_id": 2}');
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 2,
       overlay(:'cursor' PLACING CASE substr(:'cursor', 20, 1) WHEN 'A' THEN 'B' ELSE 'A' END FROM 20));
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 2, 'not a cursor');
SELECT tenant_scale.rotate_cursor_secret();
SELECT tenant_scale.keyset_page('orders', ARRAY['id'], 2, :'cursor');

-- A relation without a primary key can be paged by a unique index on NOT NULL columns in order_by.
CREATE TABLE events (code text NOT NULL UNIQUE, seen_at timestamptz);
INSERT INTO events VALUES ('b', now()), ('a', now()), ('c', NULL);
SELECT jsonb_path_query_array(tenant_scale.keyset_page('events', ARRAY['code desc'], 5), '$.data[*].code');
SELECT tenant_scale.keyset_page('events', ARRAY['seen_at'], 5);

-- keyset_page_explain shows the plan of each statement keyset_page runs: every page is a seek through
-- an index matching the order (a row-value comparison when all keys sort one way, NOT NULL).
CREATE INDEX orders_placed_at_id ON orders (placed_at, id);
SET enable_seqscan = off;
SELECT tenant_scale.keyset_page('orders', ARRAY['placed_at'], 2) ->> 'next_cursor' AS cursor \gset
SELECT * FROM tenant_scale.keyset_page_explain('orders', ARRAY['placed_at'], 2, :'cursor');
RESET enable_seqscan;

DROP TABLE orders, events;
DROP FUNCTION page_ids(jsonb);
