-- Every statement Conduit runs, by name. conduit/store/store.py is the only code that runs them.
-- Batched statements take parallel arrays and unnest them: one statement for many tasks. Arrays
-- of ids and attempts come as text (`%(id)s`, "{1,2,3}"): the Store writes one with a join, where
-- psycopg would dump a list of ints element by element in Python, about four times as slow.
-- Statements that read `tasks` by id or in order are planned at every run (the Store does not
-- prepare them: REPLANNED in ops.py), so the plan fits the buckets as they are. A plan cached while a
-- bucket looked small (truncated, vacuumed between bursts) would scan, hash or sort all of it once
-- it fills: a chaos run at 2,000 tasks/s saw leases sorting every pending row of their queue and
-- lookups taking seconds inside a commit other brokers waited on. A statement by id also names
-- the bucket of its ids (`%(bucket)s`, see schema.sql), so it is planned for one partition.

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

-- name: migrate_to_3_before
-- Version 2 to 3, first step: move version 2's tables out of the way and drop what counted them;
-- schema.sql then runs over what is left, and migrate_to_3_after copies the tasks across.
DROP TRIGGER tasks_count_insert ON tasks;
DROP TRIGGER tasks_count_update ON tasks;
DROP TRIGGER tasks_count_delete ON tasks;
DROP TRIGGER results_count_insert ON results;
DROP TRIGGER results_count_delete ON results;
DROP FUNCTION count_tasks();
DROP INDEX tasks_due, tasks_running, tasks_buffered, results_dead, idempotency_keys_task;
ALTER TABLE tasks RENAME TO tasks_v2;
ALTER INDEX tasks_pkey RENAME TO tasks_v2_pkey;
ALTER TABLE results RENAME TO results_v2;
ALTER INDEX results_pkey RENAME TO results_v2_pkey;
ALTER TABLE brokers RENAME TO brokers_v2;
ALTER INDEX brokers_pkey RENAME TO brokers_v2_pkey;

-- name: migrate_to_3_after
-- Buffered tasks become pending (version 2's brokers cannot run on version 3); running ones keep
-- their task lease under owner 0, no broker. Finished tasks older than the retention are not kept.
INSERT INTO policies (max_attempts, lease_timeout, backoff_base, backoff_max)
SELECT max_attempts, lease_timeout, backoff_base, backoff_max FROM tasks_v2
UNION
SELECT max_attempts, lease_timeout, backoff_base, backoff_max FROM results_v2
ON CONFLICT DO NOTHING;
INSERT INTO tasks (id, queue, priority, run_at, attempt, failures, policy, owner, lease_expires_at, payload,
                   idempotency_key, last_error)
SELECT t.id, t.queue, t.priority, t.run_at, t.attempt, t.failures, p.id,
       CASE WHEN t.state = 'running' THEN 0 END, CASE WHEN t.state = 'running' THEN t.lease_expires_at END,
       t.payload, t.idempotency_key, t.last_error
FROM tasks_v2 t JOIN policies p USING (max_attempts, lease_timeout, backoff_base, backoff_max);
SELECT ensure_partitions(d, (extract(epoch FROM now() - d) / 86400)::int + 3)
FROM (SELECT greatest(coalesce(min(finished_at), now()), now() - interval '7 days') AS d FROM results_v2) f;
INSERT INTO history (id, queue, state, attempt, failures, priority, policy, idempotency_key, payload, result,
                     last_error, finished_at)
SELECT r.id, r.queue, r.state, r.attempt, r.failures, r.priority, p.id, r.idempotency_key, r.payload,
       r.result, r.last_error, r.finished_at
FROM results_v2 r JOIN policies p USING (max_attempts, lease_timeout, backoff_base, backoff_max)
WHERE r.finished_at >= date_trunc('day', now() - interval '7 days', 'UTC');
DELETE FROM queue_counts;
INSERT INTO queue_counts
SELECT queue, CASE WHEN owner IS NULL THEN 'pending' WHEN lease_expires_at IS NULL THEN 'buffered' ELSE 'running' END,
       count(*)
FROM tasks GROUP BY 1, 2;
INSERT INTO queue_counts SELECT queue, state, count(*) FROM history GROUP BY 1, 2;
DROP TABLE tasks_v2, results_v2, brokers_v2;

-- name: migrate_to_4_before
-- Version 3 to 4: `tasks` becomes partitioned by bucket, its columns reordered. The old table and
-- what depends on it move aside; schema.sql then makes the new one, and migrate_to_4_after copies
-- the rows across. A completion batch may now leave out its attempts (every one 1); history and
-- completions get the indexes that page through finished tasks by queue, state and time.
DROP VIEW live_tasks;
DROP INDEX tasks_due, tasks_leased, history_dead;
ALTER TABLE completions ALTER COLUMN attempts DROP NOT NULL;
ALTER TABLE tasks RENAME TO tasks_v3;
ALTER INDEX tasks_pkey RENAME TO tasks_v3_pkey;

-- name: migrate_to_4_after
INSERT INTO tasks (id, queue, priority, run_at, attempt, failures, policy, owner, lease_expires_at, payload,
                   idempotency_key, last_error)
SELECT id, queue, priority, run_at, attempt, failures, policy, owner, lease_expires_at, payload,
       idempotency_key, last_error
FROM tasks_v3;
DROP TABLE tasks_v3;

-- name: migrate_to_5
-- Version 4 to 5: paused queues (as in schema.sql).
CREATE TABLE IF NOT EXISTS paused_queues (
    queue     text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);
UPDATE meta SET value = '5' WHERE key = 'schema_version';

-- name: migrate_to_6
-- Version 5 to 6: brokers record their gossip endpoint too (as in schema.sql).
ALTER TABLE brokers ADD COLUMN IF NOT EXISTS pub text;
UPDATE meta SET value = '6' WHERE key = 'schema_version';

-- name: migrate_to_7
-- Version 6 to 7: prune() reads a date only from partition names that end in one (as in
-- schema.sql). Version 6's could fail on a task bucket's name, by the plan's order of tests.
CREATE OR REPLACE FUNCTION prune(keep interval) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    cutoff timestamptz := now() - keep;
    part record;
    dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('conduit partitions ' || current_schema()));
    FOR part IN
        SELECT c.relname AS name, p.relname AS parent
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.oid IN ('history'::regclass, 'completions'::regclass)
          -- CASE: the planner may test this before the parent, on any inherited table's name (a
          -- task bucket's, say), and to_date fails on a name that ends in no date.
          AND CASE WHEN right(c.relname, 9) ~ '^_[0-9]{8}$'
                   THEN to_date(right(c.relname, 8), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC'
                        + interval '1 day' <= cutoff
                   ELSE false END
        ORDER BY c.relname
    LOOP
        IF part.parent = 'history' THEN
            EXECUTE format('INSERT INTO queue_counts SELECT queue, state, -count(*) FROM %I GROUP BY 1, 2',
                           part.name);
        ELSE
            EXECUTE format('INSERT INTO queue_counts SELECT queue, ''completed'', -sum(cardinality(ids))'
                           ' FROM %I GROUP BY 1', part.name);
        END IF;
        EXECUTE format('DROP TABLE %I', part.name);
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM idempotency_keys WHERE created_at < cutoff;
    DELETE FROM submit_keys WHERE created_at < cutoff;
    RETURN dropped;
END $$;
UPDATE meta SET value = '7' WHERE key = 'schema_version';

-- name: policy_ids
-- The policies of a batch, made where new (one row per distinct policy, not per task).
SELECT policy_id(m, l, b, x)
FROM unnest(%(max_attempts)s::int[], %(lease_timeout)s::float8[], %(backoff_base)s::float8[],
            %(backoff_max)s::float8[]) AS u(m, l, b, x);

-- name: insert_plain
-- Tasks without idempotency keys. Ids come from the sequence in input order, so the caller sorts
-- the returned ids to match its rows. A column whose value is the same for every row comes as one
-- value (its name with _all) and a NULL array. Rows marked `owned` are inserted already held by
-- broker %(epoch)s, attempt 1, when its lease is live (locked FOR SHARE: see `brokers`); they enter
-- no due index and need no lease write; the rest are pending.
WITH owner AS (
    SELECT epoch FROM brokers
    WHERE epoch = %(epoch)s AND expires_at > statement_timestamp()
    FOR SHARE
), inserted AS (
    INSERT INTO tasks (queue, payload, priority, run_at, policy, owner, attempt)
    SELECT coalesce(queue, %(queue_all)s::text), payload,
           coalesce(priority, %(priority_all)s::smallint),
           now() + coalesce(delay, %(delay_all)s::float8) * interval '1 second',
           coalesce(policy, %(policy_all)s::int),
           CASE WHEN coalesce(owned, %(owned_all)s::bool) THEN (SELECT epoch FROM owner) END,
           CASE WHEN coalesce(owned, %(owned_all)s::bool) AND EXISTS (SELECT 1 FROM owner) THEN 1 ELSE 0 END
    FROM unnest(%(queue)b::text[], %(payload)b::bytea[], %(priority)b::smallint[], %(delay)b::float8[],
                %(policy)b::int[], %(owned)b::bool[])
         WITH ORDINALITY AS i(queue, payload, priority, delay, policy, owned, ord)
    ORDER BY ord
    RETURNING id, queue, owner
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, CASE WHEN owner IS NULL THEN 'pending' ELSE 'buffered' END, count(*) FROM inserted GROUP BY 1, 2
)
SELECT id, owner IS NOT NULL FROM inserted;

-- name: insert_keyed
-- As insert_plain, with idempotency keys: rows whose key belongs to an earlier submit insert
-- nothing and report that task's id; a NULL id means the key is another transaction's, and
-- lookup_keys finds it.
WITH owner AS (
    SELECT epoch FROM brokers
    WHERE epoch = %(epoch)s AND expires_at > statement_timestamp()
    FOR SHARE
), numbered AS MATERIALIZED (
    SELECT coalesce(i.queue, %(queue_all)s::text) AS queue, i.payload,
           coalesce(i.priority, %(priority_all)s::smallint) AS priority,
           coalesce(i.delay, %(delay_all)s::float8) AS delay,
           coalesce(i.policy, %(policy_all)s::int) AS policy,
           coalesce(i.owned, %(owned_all)s::bool) AND EXISTS (SELECT 1 FROM owner) AS owned,
           i.idempotency_key, i.ord, nextval('task_ids') AS id
    FROM unnest(%(queue)b::text[], %(payload)b::bytea[], %(priority)b::smallint[], %(delay)b::float8[],
                %(policy)b::int[], %(owned)b::bool[], %(idempotency_key)b::text[])
         WITH ORDINALITY AS i(queue, payload, priority, delay, policy, owned, idempotency_key, ord)
    ORDER BY i.ord
), claimed AS (
    INSERT INTO idempotency_keys (queue, key, task_id)
    SELECT queue, idempotency_key, id FROM numbered WHERE idempotency_key IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING queue, key, task_id
), inserted AS (
    INSERT INTO tasks (id, queue, payload, priority, run_at, policy, idempotency_key, owner, attempt)
    SELECT n.id, n.queue, n.payload, n.priority, now() + n.delay * interval '1 second', n.policy,
           n.idempotency_key, CASE WHEN n.owned THEN %(epoch)s::bigint END, CASE WHEN n.owned THEN 1 ELSE 0 END
    FROM numbered n
    WHERE n.idempotency_key IS NULL OR n.id IN (SELECT task_id FROM claimed)
    RETURNING id, queue, owner
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, CASE WHEN owner IS NULL THEN 'pending' ELSE 'buffered' END, count(*) FROM inserted GROUP BY 1, 2
)
SELECT coalesce(ins.id, c.task_id) AS id, ins.id IS NOT NULL AS created, ins.owner IS NOT NULL AS owned
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
SET ids = (%(id)s::bigint[])[a.last - a.n + 1 : a.last]
FROM (
    SELECT key, n, sum(n) OVER (ORDER BY ord) AS last
    FROM unnest(%(key)b::text[], %(n)b::int[]) WITH ORDINALITY AS u(key, n, ord)
) a
WHERE s.key = a.key;

-- name: lease
-- Due tasks in (priority, run_at, id) order into a broker's buffer: the backlog path, one update a
-- task. SKIP LOCKED so brokers never wait on each other; each lease bumps the attempt.
WITH owner AS (
    SELECT epoch FROM brokers
    WHERE epoch = %(epoch)s AND expires_at > statement_timestamp()
    FOR SHARE
), picked AS (
    SELECT t.id FROM tasks t
    WHERE t.queue = %(queue)s AND t.owner IS NULL AND t.run_at <= now() AND EXISTS (SELECT 1 FROM owner)
    ORDER BY t.priority, t.run_at, t.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE tasks t
    SET owner = %(epoch)s, attempt = t.attempt + 1
    FROM picked
    WHERE t.id = picked.id
    RETURNING t.id, t.queue, t.priority, t.run_at, t.attempt, t.failures, t.policy, t.payload
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, s, n FROM (SELECT queue, count(*) AS c FROM leased GROUP BY 1) g,
           LATERAL (VALUES ('pending', -g.c), ('buffered', g.c)) AS v(s, n)
)
SELECT l.id, l.queue, l.priority, l.run_at, l.attempt, l.failures, p.max_attempts, p.lease_timeout, l.payload
FROM leased l JOIN policies p ON p.id = l.policy;

-- name: start
-- Deliveries of a stopping broker made task leases, so they outlive it (renewed by heartbeats).
WITH started AS (
    UPDATE tasks t
    SET lease_expires_at = now() + p.lease_timeout * interval '1 second'
    FROM (SELECT DISTINCT * FROM unnest(%(id)s::bigint[], %(attempt)s::int[]) AS u(id, attempt)) r, policies p
    WHERE t.id = r.id AND t.attempt = r.attempt AND t.owner = %(epoch)s AND t.lease_expires_at IS NULL
      AND ((t.id >> 17) & 7) = %(bucket)s::bigint
      AND p.id = t.policy
      AND EXISTS (SELECT 1 FROM brokers b WHERE b.epoch = %(epoch)s AND b.expires_at > now())
    RETURNING t.id, t.attempt, t.queue
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, s, n FROM (SELECT queue, count(*) AS c FROM started GROUP BY 1) g,
           LATERAL (VALUES ('buffered', -g.c), ('running', g.c)) AS v(s, n)
)
SELECT id, attempt FROM started;

-- name: renew
-- A heartbeat through any broker keeps the lease of the delivery that holds the current attempt;
-- the first one makes the broker's in-memory delivery a task lease in the database.
WITH held AS (
    SELECT t.id, t.lease_expires_at IS NULL AS was_buffered
    FROM tasks t
    JOIN (SELECT DISTINCT * FROM unnest(%(id)s::bigint[], %(attempt)s::int[]) AS u(id, attempt)) r
      ON t.id = r.id AND t.attempt = r.attempt
    WHERE t.owner IS NOT NULL AND ((t.id >> 17) & 7) = %(bucket)s::bigint
    FOR UPDATE OF t
), renewed AS (
    UPDATE tasks t
    SET owner = %(epoch)s, lease_expires_at = now() + p.lease_timeout * interval '1 second'
    FROM held h, policies p
    WHERE t.id = h.id AND p.id = t.policy AND ((t.id >> 17) & 7) = %(bucket)s::bigint
    RETURNING t.id, t.attempt, t.queue, h.was_buffered
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, s, n FROM (SELECT queue, count(*) AS c FROM renewed WHERE was_buffered GROUP BY 1) g,
           LATERAL (VALUES ('buffered', -g.c), ('running', g.c)) AS v(s, n)
)
SELECT id, attempt FROM renewed;

-- name: complete
-- The first of duplicate completions in one batch wins; the rest are refused as finished. A task
-- done at its first try adds its id, attempt and result to one row per queue and block of 4,096
-- ids: a batch that mixes old ids with new (retries) would otherwise span all between, and every
-- lookup of an id there would search its array.
WITH r AS (
    SELECT DISTINCT ON (id, attempt) *
    FROM unnest(%(id)s::bigint[], %(attempt)s::int[], %(result)b::bytea[]) WITH ORDINALITY
        AS r(id, attempt, result, ord)
    ORDER BY id, attempt, ord
), done AS (
    DELETE FROM tasks t USING r
    WHERE t.id = r.id AND t.attempt = r.attempt AND t.owner IS NOT NULL
      AND ((t.id >> 17) & 7) = %(bucket)s::bigint
    RETURNING t.id, t.queue, t.attempt, t.failures, t.priority, t.policy, t.idempotency_key, t.last_error,
              t.lease_expires_at IS NULL AS was_buffered, r.result
), kept AS (
    INSERT INTO history (id, queue, state, attempt, failures, priority, policy, idempotency_key, result,
                         last_error)
    SELECT id, queue, 'completed', attempt, failures, priority, policy, idempotency_key, result, last_error
    FROM done
    WHERE failures > 0 OR last_error IS NOT NULL
), batched AS (
    INSERT INTO completions (queue, lo, hi, ids, attempts, results)
    SELECT queue, min(id), max(id), array_agg(id), CASE WHEN bool_or(attempt <> 1) THEN array_agg(attempt) END,
           CASE WHEN bool_or(result IS NOT NULL) THEN array_agg(result) END
    FROM done
    WHERE failures = 0 AND last_error IS NULL
    GROUP BY queue, id >> 12  -- a row per 4,096 ids: a lookup's span search finds few rows
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, s, n
    FROM (SELECT queue, count(*) FILTER (WHERE was_buffered) AS b, count(*) FILTER (WHERE NOT was_buffered) AS r,
                 count(*) AS c
          FROM done GROUP BY 1) g,
         LATERAL (VALUES ('buffered', -g.b), ('running', -g.r), ('completed', g.c)) AS v(s, n)
    WHERE n <> 0
)
SELECT id, attempt, queue FROM done;  -- the queue: brokers count completions by it (metrics)

-- name: fail
-- A failed run: back to pending after an exponential backoff with equal jitter, or dead once it
-- has failed max_attempts times (or the caller says not to retry). The attempt is kept.
-- With %(epoch)s set, only tasks still held in memory by that broker are touched: a broker
-- expires its deliveries that no heartbeat ever turned into a task lease.
WITH r AS (
    SELECT DISTINCT ON (id, attempt) *
    FROM unnest(%(id)s::bigint[], %(attempt)s::int[], %(error)b::text[], %(retry)b::bool[]) WITH ORDINALITY
        AS r(id, attempt, error, retry, ord)
    ORDER BY id, attempt, ord
), failed AS (
    SELECT t.id, t.queue, t.lease_expires_at IS NULL AS was_buffered, r.error,
           r.retry AND t.failures + 1 < p.max_attempts AS again, p.backoff_base, p.backoff_max
    FROM tasks t
    JOIN r ON t.id = r.id AND t.attempt = r.attempt AND t.owner IS NOT NULL
    JOIN policies p ON p.id = t.policy
    WHERE ((t.id >> 17) & 7) = %(bucket)s::bigint
      AND (%(epoch)s::bigint IS NULL OR (t.owner = %(epoch)s::bigint AND t.lease_expires_at IS NULL))
    FOR UPDATE OF t
), retried AS (
    UPDATE tasks t
    SET owner = NULL, lease_expires_at = NULL, failures = t.failures + 1, last_error = f.error,
        run_at = now() + least(f.backoff_max, f.backoff_base * 2 ^ least(t.failures, 60))
                         * (0.5 + random() / 2) * interval '1 second'
    FROM failed f
    WHERE t.id = f.id AND f.again AND ((t.id >> 17) & 7) = %(bucket)s::bigint
    RETURNING t.id, t.attempt, t.queue
), buried AS (
    DELETE FROM tasks t USING failed f
    WHERE t.id = f.id AND NOT f.again AND ((t.id >> 17) & 7) = %(bucket)s::bigint
    RETURNING t.*, f.error
), dead AS (
    INSERT INTO history (id, queue, state, attempt, failures, priority, policy, idempotency_key, payload,
                         last_error)
    SELECT id, queue, 'dead', attempt, failures + 1, priority, policy, idempotency_key, payload, error
    FROM buried
    RETURNING id, attempt, queue
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, state, sum(n) FROM (
        SELECT queue, CASE WHEN was_buffered THEN 'buffered' ELSE 'running' END AS state, -1 AS n FROM failed
        UNION ALL
        SELECT queue, CASE WHEN again THEN 'pending' ELSE 'dead' END, 1 FROM failed
    ) d GROUP BY 1, 2
)
-- With the queue and whether the task is dead now: brokers count failures by queue (metrics).
SELECT id, attempt, queue, false FROM retried UNION ALL SELECT id, attempt, queue, true FROM dead;

-- name: release
-- Unstarted tasks given back: pending again, attempt kept so the old delivery stays fenced off.
WITH held AS (
    SELECT t.id, t.queue, t.lease_expires_at IS NULL AS was_buffered
    FROM tasks t
    JOIN (SELECT DISTINCT * FROM unnest(%(id)s::bigint[], %(attempt)s::int[]) AS u(id, attempt)) r
      ON t.id = r.id AND t.attempt = r.attempt
    WHERE t.owner IS NOT NULL AND ((t.id >> 17) & 7) = %(bucket)s::bigint
    FOR UPDATE OF t
), released AS (
    UPDATE tasks t
    SET owner = NULL, lease_expires_at = NULL
    FROM held h
    WHERE t.id = h.id AND ((t.id >> 17) & 7) = %(bucket)s::bigint
    RETURNING t.id, t.attempt
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, state, sum(n) FROM (
        SELECT queue, CASE WHEN was_buffered THEN 'buffered' ELSE 'running' END AS state, -1 AS n FROM held
        UNION ALL
        SELECT queue, 'pending', 1 FROM held
    ) d GROUP BY 1, 2
)
SELECT id, attempt FROM released;

-- name: expired_running
SELECT id, attempt FROM tasks
WHERE lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: reap_brokers
-- Incarnations whose lease ended: what they held in memory goes back to pending, and they are
-- forgotten. One pass over the live table per dead incarnation, never per tick (no index on owner:
-- it would cost every task an index entry). A broker still writing as owner holds its row FOR
-- SHARE: skipped now, buried on a later pass, after its commit.
WITH dead AS (
    SELECT epoch FROM brokers WHERE expires_at <= now() FOR UPDATE SKIP LOCKED
), returned AS (
    UPDATE tasks t
    SET owner = NULL
    WHERE t.owner IN (SELECT epoch FROM dead) AND t.lease_expires_at IS NULL
    RETURNING t.queue
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, s, n FROM (SELECT queue, count(*) AS c FROM returned GROUP BY 1) g,
           LATERAL (VALUES ('buffered', -g.c), ('pending', g.c)) AS v(s, n)
), gone AS (
    DELETE FROM brokers WHERE epoch IN (SELECT epoch FROM dead)
)
SELECT count(*) FROM returned;

-- name: cancel
WITH gone AS (
    DELETE FROM tasks WHERE id = ANY(%(id)s::bigint[]) RETURNING *
), kept AS (
    INSERT INTO history (id, queue, state, attempt, failures, priority, policy, idempotency_key, payload,
                         last_error)
    SELECT id, queue, 'cancelled', attempt, failures, priority, policy, idempotency_key, payload, last_error
    FROM gone
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, state, sum(n) FROM (
        SELECT queue,
               CASE WHEN owner IS NULL THEN 'pending' WHEN lease_expires_at IS NULL THEN 'buffered'
                    ELSE 'running' END AS state,
               -1 AS n
        FROM gone
        UNION ALL
        SELECT queue, 'cancelled', 1 FROM gone
    ) d GROUP BY 1, 2
)
SELECT id FROM gone;

-- name: dead_page
-- A page of a queue's dead tasks, oldest first, locked for `retry` in the same transaction (redrive).
SELECT id FROM history
WHERE state = 'dead' AND queue = %(queue)s AND (%(id)b::bigint[] IS NULL OR id = ANY(%(id)b::bigint[]))
ORDER BY finished_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: retry
-- Dead or cancelled tasks back to pending, failures forgiven. The attempt is kept (and grows at
-- the next lease), so a delivery from before the cancel stays fenced off.
WITH back AS (
    DELETE FROM history
    WHERE (id, finished_at) IN (SELECT id, finished_at FROM history
                                WHERE id = ANY(%(id)b::bigint[]) AND state IN ('dead', 'cancelled')
                                FOR UPDATE SKIP LOCKED)
    RETURNING *
), revived AS (
    INSERT INTO tasks (id, queue, priority, run_at, attempt, failures, policy, idempotency_key, payload,
                       last_error)
    SELECT id, queue, priority, now(), attempt, 0, policy, idempotency_key, payload, last_error
    FROM back
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, state, sum(n) FROM (
        SELECT queue, state, -1 AS n FROM back
        UNION ALL
        SELECT queue, 'pending', 1 FROM back
    ) d GROUP BY 1, 2
)
SELECT id FROM back;

-- name: discard
-- Dead tasks dropped for good, with their payloads: what is left of a failure nobody will retry.
-- By id on history_id; a task that is not dead (completed, cancelled, live) is left as it is.
WITH gone AS (
    DELETE FROM history WHERE id = ANY(%(id)b::bigint[]) AND state = 'dead' RETURNING id, queue
), counted AS (
    INSERT INTO queue_counts SELECT queue, 'dead', -count(*) FROM gone GROUP BY 1
)
SELECT id FROM gone;

-- name: purge_pending
-- A page of a queue's pending tasks, from tasks_due, for `cancel` in the same transaction.
SELECT id FROM tasks
WHERE queue = %(queue)s AND owner IS NULL
ORDER BY queue, priority, run_at, id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: purge_held
-- A queue's tasks held by brokers and not yet started under a task lease (buffered, the brokers'
-- own backlogs, deliveries no heartbeat confirmed). No index holds them: one pass over the live
-- table, which holds live tasks only.
SELECT id FROM tasks
WHERE queue = %(queue)s AND owner IS NOT NULL AND lease_expires_at IS NULL
FOR UPDATE SKIP LOCKED;

-- name: list_pending
-- Pending tasks in the order they will run, a page at a time: a keyset on tasks_due's columns.
-- "since" is run_at: when the task came (or comes) due.
SELECT id, queue, 'pending', priority, attempt, failures, run_at, NULL::text, last_error
FROM tasks
WHERE owner IS NULL
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(older)s::float8 IS NULL OR run_at <= now() - %(older)s::float8 * interval '1 second')
  AND (%(newer)s::float8 IS NULL OR run_at >= now() - %(newer)s::float8 * interval '1 second')
  AND (%(k_id)s::bigint IS NULL
       OR (queue, priority, run_at, id) > (%(k_queue)s::text, %(k_priority)s::smallint,
                                           %(k_at)s::timestamptz, %(k_id)s::bigint))
ORDER BY queue, priority, run_at, id
LIMIT %(limit)s;

-- name: list_live
-- Live tasks in id order (the primary key), of one state or any: held and running tasks are few
-- (buffers, backlogs and workers' hands), but pending ones are many, so their own listing above
-- reads tasks_due. "since" is run_at.
SELECT id, queue, state, priority, attempt, failures, run_at, broker, last_error
FROM live_tasks
WHERE (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(older)s::float8 IS NULL OR run_at <= now() - %(older)s::float8 * interval '1 second')
  AND (%(newer)s::float8 IS NULL OR run_at >= now() - %(newer)s::float8 * interval '1 second')
  AND (%(k_id)s::bigint IS NULL OR id > %(k_id)s::bigint)
ORDER BY id
LIMIT %(limit)s;

-- name: list_finished
-- Finished tasks of one state, newest first, a page at a time: a keyset on (finished_at, id),
-- read per queue from history_queue and completions_queue (the queues are the counters' own,
-- so no index scan leaves its queue). "since" is finished_at.
SELECT f.* FROM (SELECT DISTINCT queue FROM queue_counts
                 WHERE %(queue)s::text IS NULL OR queue = %(queue)s::text) q
CROSS JOIN LATERAL (
    (SELECT h.id, h.queue, h.state, h.priority, h.attempt, h.failures, h.finished_at, NULL::text,
            h.last_error
     FROM history h
     WHERE h.queue = q.queue AND h.state = %(state)s::text
       AND (%(older)s::float8 IS NULL OR h.finished_at <= now() - %(older)s::float8 * interval '1 second')
       AND (%(newer)s::float8 IS NULL OR h.finished_at >= now() - %(newer)s::float8 * interval '1 second')
       AND (%(k_id)s::bigint IS NULL OR (h.finished_at, h.id) < (%(k_at)s::timestamptz, %(k_id)s::bigint))
     ORDER BY h.finished_at DESC, h.id DESC
     LIMIT %(limit)s)
    UNION ALL
    (SELECT u.id, c.queue, 'completed', NULL::smallint, coalesce(u.attempt, 1), 0, c.finished_at, NULL::text,
            NULL::text
     FROM completions c CROSS JOIN LATERAL unnest(c.ids, c.attempts) AS u(id, attempt)
     WHERE c.queue = q.queue AND %(state)s::text = 'completed'
       AND (%(older)s::float8 IS NULL OR c.finished_at <= now() - %(older)s::float8 * interval '1 second')
       AND (%(newer)s::float8 IS NULL OR c.finished_at >= now() - %(newer)s::float8 * interval '1 second')
       AND (%(k_id)s::bigint IS NULL OR c.finished_at <= %(k_at)s::timestamptz)
       AND (%(k_id)s::bigint IS NULL OR (c.finished_at, u.id) < (%(k_at)s::timestamptz, %(k_id)s::bigint))
     ORDER BY c.finished_at DESC, u.id DESC
     LIMIT %(limit)s)
) f
ORDER BY f.finished_at DESC, f.id DESC
LIMIT %(limit)s;

-- name: show
-- Everything kept about tasks, wherever they are: live, in history, or in a completions batch.
SELECT t.id, t.queue, t.state, t.priority, t.attempt, t.failures, p.max_attempts, p.lease_timeout,
       p.backoff_base, p.backoff_max, t.run_at, t.lease_expires_at, t.broker, t.idempotency_key,
       t.payload, NULL::bytea, t.last_error, NULL::timestamptz
FROM live_tasks t JOIN policies p ON p.id = t.policy
WHERE t.id = ANY(%(id)b::bigint[])
UNION ALL
SELECT h.id, h.queue, h.state, h.priority, h.attempt, h.failures, p.max_attempts, p.lease_timeout,
       p.backoff_base, p.backoff_max, NULL, NULL, NULL, h.idempotency_key, h.payload, h.result,
       h.last_error, h.finished_at
FROM history h JOIN policies p ON p.id = h.policy
WHERE h.id = ANY(%(id)b::bigint[])
UNION ALL
SELECT i.id, c.queue, 'completed', NULL, coalesce(c.attempts[k], 1), 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, c.results[k], NULL, c.finished_at
FROM unnest(%(id)b::bigint[]) AS i(id)
JOIN completions c ON int8range(c.lo, c.hi, '[]') @> i.id
CROSS JOIN LATERAL array_position(c.ids, i.id) AS k
WHERE k IS NOT NULL;

-- name: lookup
-- Live, kept in history, completed in a batch row, or (every column NULL) unknown: never
-- submitted, or pruned.
SELECT i.id,
       coalesce(h.state, c.state,
                CASE WHEN t.id IS NULL THEN NULL WHEN t.owner IS NULL THEN 'pending'
                     WHEN t.lease_expires_at IS NULL THEN 'buffered' ELSE 'running' END),
       coalesce(h.attempt, c.attempt, t.attempt), coalesce(h.result, c.result),
       coalesce(h.last_error, t.last_error),
       coalesce(h.finished_at, c.finished_at)
FROM unnest(%(id)s::bigint[]) WITH ORDINALITY AS i(id, ord)
LEFT JOIN tasks t ON t.id = i.id
LEFT JOIN history h ON h.id = i.id
LEFT JOIN LATERAL (
    SELECT 'completed' AS state, coalesce(b.attempts[k], 1) AS attempt, b.results[k] AS result, b.finished_at
    FROM completions b, array_position(b.ids, i.id) AS k
    WHERE int8range(b.lo, b.hi, '[]') @> i.id AND k IS NOT NULL
    LIMIT 1
) c ON true
ORDER BY i.ord;

-- name: queue_stats
SELECT queue, state, sum(n)::bigint FROM queue_counts GROUP BY 1, 2 HAVING sum(n) <> 0 ORDER BY 1, 2;

-- name: pause_queue
-- '!paused' (no queue name starts with '!') tells listening brokers to reread the set, on a change.
WITH p AS (INSERT INTO paused_queues (queue) VALUES (%(queue)s) ON CONFLICT DO NOTHING RETURNING queue)
SELECT count(*)::int FROM (SELECT pg_notify('conduit_' || current_schema(), '!paused') FROM p) n;

-- name: resume_queue
WITH r AS (DELETE FROM paused_queues WHERE queue = %(queue)s RETURNING queue)
SELECT count(*)::int FROM (SELECT pg_notify('conduit_' || current_schema(), '!paused') FROM r) n;

-- name: paused_queues
SELECT queue, paused_at FROM paused_queues ORDER BY queue;

-- name: truncate_buckets
SELECT truncate_buckets();

-- name: compact_counts
WITH d AS (DELETE FROM queue_counts RETURNING *)
INSERT INTO queue_counts SELECT queue, state, sum(n) FROM d GROUP BY 1, 2 HAVING sum(n) <> 0;

-- name: ensure_partitions
-- History partitions from today to a few days ahead; cheap when they exist.
SELECT ensure_partitions(now(), %(days)s);

-- name: retention
SELECT value::float8 FROM meta WHERE key = 'retention_days';

-- name: set_retention
UPDATE meta SET value = %(days)s::text WHERE key = 'retention_days';

-- name: prune
SELECT prune(%(days)s * interval '1 day');

-- name: notify
-- A hint to other brokers that these queues have new due tasks (delivered at commit).
SELECT pg_notify('conduit_' || current_schema(), q) FROM unnest(%(queue)s::text[]) AS q;

-- name: acquire_broker
-- A (re)starting broker takes a new epoch; its earlier incarnations' leases end now, which fences
-- off what they held and hands it to the reaper.
WITH ended AS (
    UPDATE brokers SET expires_at = least(expires_at, now()) WHERE id = %(id)s
)
INSERT INTO brokers (epoch, id, endpoint, pub, expires_at)
VALUES (nextval('broker_epochs'), %(id)s, %(endpoint)s, %(pub)s, now() + %(term)s * interval '1 second')
RETURNING epoch;

-- name: renew_broker
-- Only a live lease can be renewed: a broker that let its lease lapse must drop its buffer.
UPDATE brokers SET expires_at = now() + %(term)s * interval '1 second'
WHERE epoch = %(epoch)s AND expires_at > now()
RETURNING expires_at;

-- name: check_broker
SELECT 1 FROM brokers WHERE epoch = %(epoch)s AND expires_at > now();

-- name: drop_broker
-- A clean stop ends the lease now; the reaper returns whatever is left and forgets the row.
UPDATE brokers SET expires_at = least(expires_at, now()) WHERE epoch = %(epoch)s;

-- name: live_brokers
SELECT DISTINCT ON (id) endpoint FROM brokers WHERE expires_at > now() ORDER BY id, epoch DESC;

-- name: broker_peers
-- The other brokers whose lease is live, with their endpoints: what PONG and GOSSIP name.
SELECT DISTINCT ON (id) id, endpoint, pub FROM brokers
WHERE expires_at > now() AND id <> %(id)s ORDER BY id, epoch DESC;

-- name: broker_rows
-- Every broker incarnation the table holds (live ones, and ended ones the reaper has not buried
-- yet): a few rows, one per broker restart.
SELECT id, epoch, endpoint, started_at, expires_at, expires_at > now(), now()
FROM brokers ORDER BY id, epoch DESC;

-- name: read_back
-- A broker's own backlog, read back in id order: tasks it inserted held that did not fit its
-- buffer, a run of consecutive ids that are all its own. No write: they are its already.
SELECT t.id, t.queue, t.priority, t.run_at, t.attempt, t.failures, p.max_attempts, p.lease_timeout, t.payload
FROM tasks t JOIN policies p ON p.id = t.policy
WHERE t.id BETWEEN %(lo)s AND %(hi)s AND t.owner = %(epoch)s AND t.lease_expires_at IS NULL
  AND t.queue = %(queue)s
  AND EXISTS (SELECT 1 FROM brokers b WHERE b.epoch = %(epoch)s AND b.expires_at > now())
ORDER BY t.id
LIMIT %(limit)s;

-- name: release_spans
-- A broker gives back its own backlog (stopping, or nobody polls it here): pending again.
WITH released AS (
    UPDATE tasks t
    SET owner = NULL
    FROM unnest(%(queue)b::text[], %(lo)b::bigint[], %(hi)b::bigint[]) AS s(queue, lo, hi)
    WHERE t.id BETWEEN s.lo AND s.hi AND t.queue = s.queue AND t.owner = %(epoch)s
      AND t.lease_expires_at IS NULL
    RETURNING t.queue
), counted AS (
    INSERT INTO queue_counts
    SELECT queue, s, n FROM (SELECT queue, count(*) AS c FROM released GROUP BY 1) g,
           LATERAL (VALUES ('buffered', -g.c), ('pending', g.c)) AS v(s, n)
)
SELECT count(*) FROM released;
