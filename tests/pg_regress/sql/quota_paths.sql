-- Every way a row can arrive, leave or move to another company is counted, and whatever is undone is
-- given back. After each step, the counter (quota_status) is compared with the truth (COUNT(*)).
CREATE TABLE orders (id integer PRIMARY KEY, company text, amount integer NOT NULL DEFAULT 0);
CREATE INDEX ON orders (company);
SELECT tenant_scale.set_plan_limit('free', 'orders', 5);
SELECT tenant_scale.enforce_quota('orders', 'orders', 'company');
CREATE VIEW usage AS
    SELECT company,
           (SELECT used FROM tenant_scale.quota_status(company) WHERE resource = 'orders') AS counted,
           (SELECT count(*) FROM orders o WHERE o.company = c.company) AS actual
    FROM (VALUES ('a'), ('b')) AS c (company);

-- INSERT, multi-row INSERT, INSERT ... SELECT, COPY.
INSERT INTO orders (id, company) VALUES (1, 'a');
INSERT INTO orders (id, company) VALUES (2, 'a'), (3, 'b');
INSERT INTO orders (id, company) SELECT i, 'b' FROM generate_series(4, 5) AS i;
COPY orders (id, company) FROM STDIN;
6	a
7	b
\.
SELECT * FROM usage;

-- DELETE frees places (once committed).
DELETE FROM orders WHERE id IN (1, 7);
SELECT * FROM usage;

-- An UPDATE that moves a row to another company counts against the new one; one that keeps the
-- company changes nothing.
UPDATE orders SET company = 'b' WHERE id = 2;
UPDATE orders SET amount = 10 WHERE company = 'b';
SELECT * FROM usage;
INSERT INTO orders (id, company) VALUES (8, 'b'), (9, 'b');
UPDATE orders SET company = 'b' WHERE id = 6;
SELECT * FROM usage;

-- ROLLBACK, ROLLBACK TO SAVEPOINT and a statement failing half-way give back what they took.
BEGIN;
INSERT INTO orders (id, company) VALUES (10, 'a'), (11, 'a');
ROLLBACK;
BEGIN;
INSERT INTO orders (id, company) VALUES (10, 'a');
SAVEPOINT s;
INSERT INTO orders (id, company) VALUES (11, 'a'), (12, 'a');
ROLLBACK TO SAVEPOINT s;
DELETE FROM orders WHERE id = 10;
COMMIT;
SELECT * FROM usage;
INSERT INTO orders (id, company) VALUES (20, 'a'), (21, 'a'), (6, 'a');
SELECT * FROM usage;

-- INSERT ... ON CONFLICT: a skipped or updated row is not a new row, even at the limit.
INSERT INTO orders (id, company) VALUES (20, 'a'), (21, 'a'), (22, 'a'), (23, 'a');
SELECT * FROM usage;
INSERT INTO orders (id, company) VALUES (20, 'a') ON CONFLICT (id) DO NOTHING;
INSERT INTO orders (id, company, amount) VALUES (21, 'a', 99) ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount;
INSERT INTO orders (id, company) VALUES (24, 'a') ON CONFLICT (id) DO NOTHING;
INSERT INTO orders (id, company) VALUES (24, 'a'), (25, 'a') ON CONFLICT (id) DO UPDATE SET amount = 1;
SELECT * FROM usage;
-- ... and a conflict that moves the row to another company counts there.
DELETE FROM orders WHERE company = 'b' AND id > 5;
INSERT INTO orders (id, company) VALUES (22, 'b') ON CONFLICT (id) DO UPDATE SET company = EXCLUDED.company;
SELECT * FROM usage;

-- TRUNCATE empties every company; undone by ROLLBACK TO SAVEPOINT, it empties nothing.
BEGIN;
SAVEPOINT s;
TRUNCATE orders;
INSERT INTO orders (id, company) VALUES (1, 'a');
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT * FROM usage;
TRUNCATE orders;
SELECT * FROM usage;
INSERT INTO orders (id, company) SELECT i, 'a' FROM generate_series(1, 5) AS i;
SELECT * FROM usage;

-- Two-phase commit is refused: a prepared transaction would outlive the session holding its
-- reservations.
BEGIN;
DELETE FROM orders WHERE id = 1;
PREPARE TRANSACTION 'orders';
SELECT * FROM usage;

-- The quota trigger must fire last among BEFORE triggers (they fire in name order).
CREATE FUNCTION keep_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER zzz_after_quota BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION keep_row();
INSERT INTO orders (id, company) VALUES (30, 'b');
DROP TRIGGER zzz_after_quota ON orders;
DROP FUNCTION keep_row();

-- A superuser can bypass triggers (session_replication_role = replica); reconcile() recounts and
-- reports what it corrected.
SET session_replication_role = replica;
INSERT INTO orders (id, company) VALUES (40, 'a'), (41, 'b');
RESET session_replication_role;
SELECT * FROM usage;
-- health() (for monitoring roles) recounts a sample of counters and reports the disagreement.
SELECT ok, detail FROM tenant_scale.health() WHERE "check" = 'quotas';
SELECT * FROM tenant_scale.reconcile('orders') ORDER BY company_id;
SELECT * FROM usage;
SELECT ok, detail FROM tenant_scale.health() WHERE "check" = 'quotas';
SELECT * FROM tenant_scale.reconcile();

-- Counters in shared memory, for sizing tenant_scale.max_quota_counters.
SELECT in_use > 0 AS in_use, capacity, evicted FROM tenant_scale.quota_counters();

DROP VIEW usage;
DROP TABLE orders;
SELECT count(*) FROM tenant_scale.quotas;
