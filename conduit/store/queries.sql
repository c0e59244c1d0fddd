-- Every statement Conduit runs, by name. conduit/store/store.py is the only code that runs them.
-- Batched statements take parallel arrays and unnest them: one statement for many tasks.

-- name: schema_version
SELECT value FROM meta WHERE key = 'schema_version';

-- name: meta_exists
SELECT to_regclass('meta') IS NOT NULL;

-- name: migrate_to_2
-- Version 1 to 2: submit keys (as in schema.sql; a test checks that both give the same tables).
CREATE TABLE submit_keys (
    key        text PRIMARY KEY,
    ids        bigint[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
UPDATE meta SET value = '2' WHERE key = 'schema_version';

-- name: enqueue_plain
-- The common case, no idempotency keys: ids come from the sequence in input order, so the
-- caller sorts the returned ids to match its rows. A column whose value is the same for every
-- row comes as one value (its name with _all) and a NULL array, sparing a dump row by row.
INSERT INTO tasks (queue, payload, priority, run_at, max_attempts, lease_timeout, backoff_base, backoff_max)
SELECT queue, payload,
       coalesce(priority, %(priority_all)s::smallint),
       now() + coalesce(delay, %(delay_all)s::float8) * interval '1 second',
       coalesce(max_attempts, %(max_attempts_all)s::int),
       coalesce(lease_timeout, %(lease_timeout_all)s::float8),
       coalesce(backoff_base, %(backoff_base_all)s::float8),
       coalesce(backoff_max, %(backoff_max_all)s::float8)
FROM unnest(%(queue)b::text[], %(payload)b::bytea[], %(priority)b::smallint[], %(delay)b::float8[],
            %(max_attempts)b::int[], %(lease_timeout)b::float8[], %(backoff_base)b::float8[],
            %(backoff_max)b::float8[])
     WITH ORDINALITY AS i(queue, payload, priority, delay, max_attempts, lease_timeout, backoff_base,
                          backoff_max, ord)
ORDER BY ord
RETURNING id;

-- name: insert_tasks
-- Plain enqueue (worker is NULL) or sync match (worker set: written once, already running).
-- Rows whose idempotency key belongs to an earlier submit insert nothing and report that task's id;
-- a NULL id means the key is another transaction's, and lookup_keys finds it.
WITH input AS (
    SELECT *
    FROM unnest(%(queue)b::text[], %(payload)b::bytea[], %(priority)b::smallint[], %(delay)b::float8[],
                %(max_attempts)b::int[], %(lease_timeout)b::float8[], %(backoff_base)b::float8[],
                %(backoff_max)b::float8[], %(idempotency_key)b::text[], %(worker)b::text[])
         WITH ORDINALITY AS i(queue, payload, priority, delay, max_attempts, lease_timeout, backoff_base,
                              backoff_max, idempotency_key, worker, ord)
), numbered AS MATERIALIZED (
    SELECT i.queue, i.payload, coalesce(i.priority, %(priority_all)s::smallint) AS priority,
           coalesce(i.delay, %(delay_all)s::float8) AS delay,
           coalesce(i.max_attempts, %(max_attempts_all)s::int) AS max_attempts,
           coalesce(i.lease_timeout, %(lease_timeout_all)s::float8) AS lease_timeout,
           coalesce(i.backoff_base, %(backoff_base_all)s::float8) AS backoff_base,
           coalesce(i.backoff_max, %(backoff_max_all)s::float8) AS backoff_max,
           i.idempotency_key, i.worker, i.ord, nextval('task_ids') AS id
    FROM input i ORDER BY i.ord
), claimed AS (
    INSERT INTO idempotency_keys (queue, key, task_id)
    SELECT queue, idempotency_key, id FROM numbered WHERE idempotency_key IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING queue, key, task_id
), inserted AS (
    INSERT INTO tasks (id, queue, payload, priority, run_at, max_attempts, lease_timeout, backoff_base,
                       backoff_max, idempotency_key, state, attempt, broker, broker_epoch, worker,
                       lease_expires_at)
    SELECT n.id, n.queue, n.payload, n.priority, now() + n.delay * interval '1 second', n.max_attempts,
           n.lease_timeout, n.backoff_base, n.backoff_max, n.idempotency_key,
           CASE WHEN n.worker IS NULL THEN 'pending' ELSE 'running' END,
           CASE WHEN n.worker IS NULL THEN 0 ELSE 1 END,
           CASE WHEN n.worker IS NULL THEN NULL ELSE %(broker)s::text END,
           CASE WHEN n.worker IS NULL THEN NULL ELSE %(epoch)s::bigint END,
           n.worker,
           CASE WHEN n.worker IS NULL THEN NULL ELSE now() + n.lease_timeout * interval '1 second' END
    FROM numbered n
    WHERE n.idempotency_key IS NULL OR n.id IN (SELECT task_id FROM claimed)
    RETURNING id
)
SELECT coalesce(ins.id, c.task_id) AS id, ins.id IS NOT NULL AS created
FROM numbered n
LEFT JOIN inserted ins ON ins.id = n.id
LEFT JOIN claimed c ON c.queue = n.queue AND c.key = n.idempotency_key
ORDER BY n.ord;

-- name: lookup_keys
SELECT k.task_id
FROM unnest(%(queue)b::text[], %(key)b::text[]) WITH ORDINALITY AS i(queue, key, ord)
LEFT JOIN idempotency_keys k ON k.queue = i.queue AND k.key = i.key
ORDER BY i.ord;

-- name: claim_submits
-- The keys this transaction is first to use. A key another transaction holds uncommitted makes
-- this wait for it: committed, the key is not returned; rolled back, it is claimed here.
INSERT INTO submit_keys (key)
SELECT unnest(%(key)s::text[])
ON CONFLICT DO NOTHING
RETURNING key;

-- name: submitted_ids
SELECT key, ids FROM submit_keys WHERE key = ANY(%(key)s::text[]);

-- name: record_submits
-- The ids of the submits whose keys this transaction claimed: all ids in one array, and per key
-- how many of them are its own, in order.
UPDATE submit_keys s
SET ids = (%(id)b::bigint[])[a.last - a.n + 1 : a.last]
FROM (
    SELECT key, n, sum(n) OVER (ORDER BY ord) AS last
    FROM unnest(%(key)b::text[], %(n)b::int[]) WITH ORDINALITY AS u(key, n, ord)
) a
WHERE s.key = a.key;

-- name: lease
-- Due tasks in (priority, run_at, id) order into a broker's buffer; SKIP LOCKED so brokers never
-- wait on each other. Each lease bumps the attempt, the fencing token.
WITH owner AS (
    SELECT 1 FROM brokers
    WHERE id = %(broker)s AND epoch = %(epoch)s AND expires_at > now()
), picked AS (
    SELECT t.id FROM tasks t
    WHERE t.queue = %(queue)s AND t.state = 'pending' AND t.run_at <= now() AND EXISTS (SELECT 1 FROM owner)
    ORDER BY t.priority, t.run_at, t.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t
SET state = 'buffered', attempt = t.attempt + 1, broker = %(broker)s, broker_epoch = %(epoch)s
FROM picked
WHERE t.id = picked.id
RETURNING t.id, t.queue, t.priority, t.run_at, t.attempt, t.failures, t.max_attempts, t.lease_timeout,
          t.payload;

-- name: start
-- Buffered tasks handed to workers: from now on a task lease, renewed by heartbeats.
UPDATE tasks t
SET state = 'running', worker = r.worker, lease_expires_at = now() + t.lease_timeout * interval '1 second'
FROM unnest(%(id)b::bigint[], %(attempt)b::int[], %(worker)b::text[]) AS r(id, attempt, worker)
WHERE t.id = r.id AND t.attempt = r.attempt AND t.state = 'buffered'
  AND t.broker = %(broker)s AND t.broker_epoch = %(epoch)s
  AND EXISTS (SELECT 1 FROM brokers b
              WHERE b.id = %(broker)s AND b.epoch = %(epoch)s AND b.expires_at > now())
RETURNING t.id, t.attempt;

-- name: renew
-- A heartbeat through any broker keeps the lease of the delivery that holds the current attempt.
UPDATE tasks t
SET state = 'running', broker = %(broker)s, broker_epoch = %(epoch)s,
    lease_expires_at = now() + t.lease_timeout * interval '1 second'
FROM unnest(%(id)b::bigint[], %(attempt)b::int[]) AS r(id, attempt)
WHERE t.id = r.id AND t.attempt = r.attempt AND t.state <> 'pending'
RETURNING t.id, t.attempt;

-- name: complete
-- The first of duplicate completions in one batch wins; the rest are refused as finished.
WITH r AS (
    SELECT DISTINCT ON (id, attempt) *
    FROM unnest(%(id)b::bigint[], %(attempt)b::int[], %(result)b::bytea[]) WITH ORDINALITY
        AS r(id, attempt, result, ord)
    ORDER BY id, attempt, ord
), done AS (
    DELETE FROM tasks t USING r
    WHERE t.id = r.id AND t.attempt = r.attempt AND t.state <> 'pending'
    RETURNING t.*, r.result
)
INSERT INTO results (id, queue, state, priority, attempt, failures, max_attempts, lease_timeout,
                     backoff_base, backoff_max, idempotency_key, result, last_error, created_at)
SELECT id, queue, 'completed', priority, attempt, failures, max_attempts, lease_timeout,
       backoff_base, backoff_max, idempotency_key, result, last_error, created_at
FROM done
RETURNING id, attempt;

-- name: fail
-- A failed run: back to pending after an exponential backoff with equal jitter, or dead once it
-- has failed max_attempts times (or the caller says not to retry). The attempt is kept.
-- With %(broker)s set, only tasks still buffered by that broker incarnation are touched: a broker
-- expires its deliveries that no heartbeat ever turned into a task lease.
WITH r AS (
    SELECT DISTINCT ON (id, attempt) *
    FROM unnest(%(id)b::bigint[], %(attempt)b::int[], %(error)b::text[], %(retry)b::bool[]) WITH ORDINALITY
        AS r(id, attempt, error, retry, ord)
    ORDER BY id, attempt, ord
), failed AS (
    SELECT t.id, r.error, r.retry AND t.failures + 1 < t.max_attempts AS again
    FROM tasks t JOIN r ON t.id = r.id AND t.attempt = r.attempt AND t.state <> 'pending'
    WHERE %(broker)s::text IS NULL
       OR (t.state = 'buffered' AND t.broker = %(broker)s::text AND t.broker_epoch = %(epoch)s::bigint)
    FOR UPDATE OF t
), retried AS (
    UPDATE tasks t
    SET state = 'pending', failures = t.failures + 1, last_error = f.error, broker = NULL,
        broker_epoch = NULL, worker = NULL, lease_expires_at = NULL,
        run_at = now() + least(t.backoff_max, t.backoff_base * 2 ^ least(t.failures, 60))
                         * (0.5 + random() / 2) * interval '1 second'
    FROM failed f
    WHERE t.id = f.id AND f.again
    RETURNING t.id, t.attempt
), buried AS (
    DELETE FROM tasks t USING failed f
    WHERE t.id = f.id AND NOT f.again
    RETURNING t.*, f.error
), dead AS (
    INSERT INTO results (id, queue, state, priority, attempt, failures, max_attempts, lease_timeout,
                         backoff_base, backoff_max, idempotency_key, payload, last_error, created_at)
    SELECT id, queue, 'dead', priority, attempt, failures + 1, max_attempts, lease_timeout,
           backoff_base, backoff_max, idempotency_key, payload, error, created_at
    FROM buried
    RETURNING id, attempt
)
SELECT id, attempt FROM retried UNION ALL SELECT id, attempt FROM dead;

-- name: release
-- Unstarted tasks given back: pending again, attempt kept so the old delivery stays fenced off.
UPDATE tasks t
SET state = 'pending', broker = NULL, broker_epoch = NULL, worker = NULL, lease_expires_at = NULL
FROM unnest(%(id)b::bigint[], %(attempt)b::int[]) AS r(id, attempt)
WHERE t.id = r.id AND t.attempt = r.attempt AND t.state <> 'pending'
RETURNING t.id, t.attempt;

-- name: expired_running
SELECT id, attempt FROM tasks
WHERE state = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: reap_buffered
-- Buffers of brokers whose lease expired or was taken over by a newer epoch go back to pending.
UPDATE tasks t
SET state = 'pending', broker = NULL, broker_epoch = NULL, worker = NULL
WHERE t.state = 'buffered'
  AND NOT EXISTS (SELECT 1 FROM brokers b
                  WHERE b.id = t.broker AND b.epoch = t.broker_epoch AND b.expires_at > now())
RETURNING t.id;

-- name: cancel
WITH gone AS (
    DELETE FROM tasks WHERE id = ANY(%(id)b::bigint[]) RETURNING *
)
INSERT INTO results (id, queue, state, priority, attempt, failures, max_attempts, lease_timeout,
                     backoff_base, backoff_max, idempotency_key, payload, last_error, created_at)
SELECT id, queue, 'cancelled', priority, attempt, failures, max_attempts, lease_timeout,
       backoff_base, backoff_max, idempotency_key, payload, last_error, created_at
FROM gone
RETURNING id;

-- name: redrive
-- Dead tasks back to pending with their failures forgiven; the attempt keeps growing.
WITH back AS (
    DELETE FROM results
    WHERE id IN (SELECT id FROM results
                 WHERE state = 'dead' AND queue = %(queue)s
                   AND (%(id)b::bigint[] IS NULL OR id = ANY(%(id)b::bigint[]))
                 ORDER BY finished_at
                 LIMIT %(limit)s
                 FOR UPDATE SKIP LOCKED)
    RETURNING *
)
INSERT INTO tasks (id, queue, priority, run_at, attempt, failures, max_attempts, lease_timeout,
                   backoff_base, backoff_max, idempotency_key, payload, last_error, created_at)
SELECT id, queue, priority, now(), attempt, 0, max_attempts, lease_timeout,
       backoff_base, backoff_max, idempotency_key, payload, last_error, created_at
FROM back
RETURNING id;

-- name: lookup
SELECT i.id, coalesce(res.state, t.state), coalesce(res.attempt, t.attempt), res.result,
       coalesce(res.last_error, t.last_error), res.finished_at
FROM unnest(%(id)b::bigint[]) WITH ORDINALITY AS i(id, ord)
LEFT JOIN tasks t ON t.id = i.id
LEFT JOIN results res ON res.id = i.id
ORDER BY i.ord;

-- name: queue_stats
SELECT queue, state, sum(n)::bigint FROM queue_counts GROUP BY 1, 2 HAVING sum(n) <> 0 ORDER BY 1, 2;

-- name: compact_counts
WITH d AS (DELETE FROM queue_counts RETURNING *)
INSERT INTO queue_counts SELECT queue, state, sum(n) FROM d GROUP BY 1, 2 HAVING sum(n) <> 0;

-- name: notify
-- A hint to other brokers that these queues have new due tasks (delivered at commit).
SELECT pg_notify('conduit_' || current_schema(), q) FROM unnest(%(queue)s::text[]) AS q;

-- name: acquire_broker
-- A (re)starting broker takes a new epoch, which fences off anything an older incarnation buffered.
INSERT INTO brokers (id, endpoint, epoch, expires_at)
VALUES (%(id)s, %(endpoint)s, 1, now() + %(term)s * interval '1 second')
ON CONFLICT (id) DO UPDATE
SET epoch = brokers.epoch + 1, endpoint = excluded.endpoint, expires_at = excluded.expires_at,
    started_at = now()
RETURNING epoch;

-- name: renew_broker
-- Only a live lease can be renewed: a broker that let its lease lapse must drop its buffer.
UPDATE brokers SET expires_at = now() + %(term)s * interval '1 second'
WHERE id = %(id)s AND epoch = %(epoch)s AND expires_at > now()
RETURNING expires_at;

-- name: check_broker
SELECT 1 FROM brokers WHERE id = %(id)s AND epoch = %(epoch)s AND expires_at > now();

-- name: drop_broker
DELETE FROM brokers WHERE id = %(id)s AND epoch = %(epoch)s;

-- name: live_brokers
SELECT endpoint FROM brokers WHERE expires_at > now() ORDER BY id;
