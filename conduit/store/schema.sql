-- Conduit's whole schema, version 7 (queries.sql holds the migrations from earlier versions).
-- `conduit db init` applies it once, inside the schema named by CONDUIT_SCHEMA (default "conduit"),
-- with that schema first on the search_path; unqualified names below land there. Every object but
-- `tasks` is made only if missing (IF NOT EXISTS, OR REPLACE): a migration moves the old tables
-- aside and runs this file over what is left.
--
-- The shape is chosen by what a task costs to write (docs/ARCHITECTURE.md, "Storage"): on the happy
-- path a task is inserted once, already owned by the broker that will deliver it, and deleted once;
-- a completion without a result adds only its id and attempt to one row per batch.

CREATE TABLE IF NOT EXISTS meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Retry policies: a task carries its policy's number, not four numbers that most tasks share.
CREATE TABLE IF NOT EXISTS policies (
    id            serial PRIMARY KEY,
    max_attempts  integer NOT NULL CHECK (max_attempts >= 1),
    lease_timeout double precision NOT NULL CHECK (lease_timeout > 0),
    backoff_base  double precision NOT NULL CHECK (backoff_base >= 0),
    backoff_max   double precision NOT NULL CHECK (backoff_max >= 0),
    UNIQUE (max_attempts, lease_timeout, backoff_base, backoff_max)
);

CREATE OR REPLACE FUNCTION policy_id(
    max_attempts integer, lease_timeout double precision, backoff_base double precision,
    backoff_max double precision
) RETURNS integer LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    found integer;
BEGIN
    SELECT p.id INTO found FROM policies p
    WHERE (p.max_attempts, p.lease_timeout, p.backoff_base, p.backoff_max)
        = (policy_id.max_attempts, policy_id.lease_timeout, policy_id.backoff_base, policy_id.backoff_max);
    IF found IS NULL THEN
        INSERT INTO policies AS p (max_attempts, lease_timeout, backoff_base, backoff_max)
        VALUES (policy_id.max_attempts, policy_id.lease_timeout, policy_id.backoff_base, policy_id.backoff_max)
        ON CONFLICT DO NOTHING
        RETURNING p.id INTO found;
    END IF;
    IF found IS NULL THEN  -- another transaction inserted it meanwhile
        SELECT p.id INTO found FROM policies p
        WHERE (p.max_attempts, p.lease_timeout, p.backoff_base, p.backoff_max)
            = (policy_id.max_attempts, policy_id.lease_timeout, policy_id.backoff_base, policy_id.backoff_max);
    END IF;
    RETURN found;
END $$;

-- Broker incarnations. Each start takes a new epoch from one sequence, so an epoch alone names an
-- owner; a task's `owner` is the epoch of the broker that holds it. Writes that make a broker an
-- owner lock its row FOR SHARE and check it is live, so the reaper (which locks dead rows FOR
-- UPDATE SKIP LOCKED) never misses tasks committed by a broker it is burying. The endpoints let
-- a broker name its live peers in PONG and GOSSIP, so one broker's address finds the whole mesh.
CREATE SEQUENCE IF NOT EXISTS broker_epochs AS bigint;

CREATE TABLE IF NOT EXISTS brokers (
    epoch      bigint PRIMARY KEY,
    id         text NOT NULL,
    endpoint   text NOT NULL,           -- its ROUTER endpoint as peers reach it (--advertise)
    pub        text,                    -- its gossip endpoint, likewise; NULL when it has none
    expires_at timestamptz NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE brokers ADD COLUMN IF NOT EXISTS pub text;  -- kept from before version 6 by a migration

-- Live tasks only. The state is in two columns: `owner` NULL is pending; an owner without a lease
-- expiry is buffered or delivered by that broker, its delivery's lease in the broker's memory;
-- with `lease_expires_at` it is running under a task lease in the database (after a heartbeat).
CREATE SEQUENCE IF NOT EXISTS task_ids AS bigint;
-- Each session takes ids in blocks: a broker's inserts get consecutive ids, which it keeps as
-- runs (its own backlog). Ids stay unique; across sessions they are not in time order.
ALTER SEQUENCE task_ids CACHE 1000;

-- Eight partitions ("buckets") by id: 2^17 consecutive ids each, a ring of 2^20. Ids are taken in
-- order, so a bucket fills in a stretch of time and then drains, and once no live row is left
-- truncate_buckets() empties it: its dead rows and their index entries go at once, even while an
-- old transaction keeps vacuum from removing any (PgQ's table rotation, without its ticks). A
-- statement by id names the bucket (this key expression, equal to a parameter) so that it opens
-- one partition; store.py computes buckets the same way. The primary key is each partition's: the
-- bucket is a function of the id, so ids are unique across them.
-- Columns widest first, so none is padded for alignment (every byte is in the WAL of every task).
CREATE TABLE tasks (
    id               bigint NOT NULL DEFAULT nextval('task_ids'),
    run_at           timestamptz NOT NULL DEFAULT now(),
    owner            bigint,                       -- brokers.epoch while buffered or delivered
    lease_expires_at timestamptz,
    attempt          integer NOT NULL DEFAULT 0,   -- fencing token: grows with every delivery
    failures         integer NOT NULL DEFAULT 0,   -- failed or abandoned runs
    policy           integer NOT NULL,             -- policies.id (no foreign key: a lookup per insert)
    priority         smallint NOT NULL DEFAULT 0,  -- lower runs first
    queue            text NOT NULL,  -- naming rule checked on the way in (a CHECK costs every update)
    payload          bytea NOT NULL,
    idempotency_key  text,
    last_error       text,
    CHECK (lease_expires_at IS NULL OR owner IS NOT NULL)
) PARTITION BY LIST (((id >> 17) & 7));
DO $$
BEGIN
    FOR b IN 0..7 LOOP
        EXECUTE format('CREATE TABLE tasks_%s PARTITION OF tasks (PRIMARY KEY (id)) FOR VALUES IN (%s)', b, b);
    END LOOP;
END $$;
-- Partial indexes: each holds only the rows its path reads. A task inserted owned enters neither.
CREATE INDEX tasks_due ON tasks (queue, priority, run_at, id) WHERE owner IS NULL;
CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE lease_expires_at IS NOT NULL;

-- Truncate the buckets that hold no live row; returns how many. The bucket ids are being taken
-- from is left alone unless vacuum or analyze measured it empty: a plan made then would treat it
-- as tiny once it fills, while a truncated bucket reads as never measured. One broker at a time;
-- the lock waits at most 50 ms for statements in flight, else the bucket waits for the next pass.
CREATE OR REPLACE FUNCTION truncate_buckets() RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    current text := 'tasks_' || (((SELECT last_value FROM task_ids) >> 17) & 7);
    part regclass;
    busy boolean;
    done integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('conduit buckets ' || current_schema())) THEN
        RETURN 0;
    END IF;
    PERFORM set_config('lock_timeout', '50ms', true);
    FOR part IN
        SELECT c.oid::regclass
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'tasks'::regclass
          AND (c.reltuples >= 0 OR (c.relname <> current AND pg_relation_size(c.oid) > 0))
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT FROM %s)', part) INTO busy;  -- no lock yet
        CONTINUE WHEN busy;
        BEGIN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', part);
            EXECUTE format('SELECT EXISTS (SELECT FROM %s)', part) INTO busy;
            IF NOT busy THEN
                EXECUTE format('TRUNCATE %s', part);
                done := done + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
    RETURN done;
END $$;

-- Live tasks with their state spelled out, for people and tests (not for hot paths).
CREATE OR REPLACE VIEW live_tasks AS
SELECT t.*,
       CASE WHEN t.owner IS NULL THEN 'pending' WHEN t.lease_expires_at IS NULL THEN 'buffered'
            ELSE 'running' END AS state,
       b.id AS broker
FROM tasks t LEFT JOIN brokers b ON b.epoch = t.owner;

-- Finished tasks, partitioned by day (UTC) and dropped by partition when older than the retention
-- (meta 'retention_days'); never swept by DELETE. `completions` has a row per queue and batch of
-- tasks completed at their first try: their ids, attempts and results as arrays, so a completion
-- costs its result's bytes and a few more, and no index entry. `history` has a row per task with
-- more to keep: an error, a payload to redrive (dead, cancelled).
CREATE TABLE IF NOT EXISTS history (
    id              bigint NOT NULL,
    queue           text NOT NULL,
    state           text NOT NULL CHECK (state IN ('completed', 'dead', 'cancelled')),
    attempt         integer NOT NULL,
    failures        integer NOT NULL,
    priority        smallint NOT NULL,
    policy          integer NOT NULL,
    idempotency_key text,
    payload         bytea,  -- dead and cancelled tasks only
    result          bytea,
    last_error      text,
    finished_at     timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (finished_at);
CREATE INDEX IF NOT EXISTS history_id ON history (id);
-- By queue and state, newest last: redrive reads the dead, `conduit tasks list` pages through any.
CREATE INDEX IF NOT EXISTS history_queue ON history (queue, state, finished_at, id);

CREATE TABLE IF NOT EXISTS completions (
    queue       text NOT NULL,
    lo          bigint NOT NULL,  -- least and greatest id: a lookup reads the rows whose span holds it
    hi          bigint NOT NULL,
    ids         bigint[] NOT NULL,
    attempts    integer[],  -- NULL when every one is 1, as in a burst: 4 bytes a task less
    results     bytea[],  -- NULL when none of them has a result
    finished_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (finished_at);
CREATE INDEX IF NOT EXISTS completions_span ON completions USING gist (int8range(lo, hi, '[]'));
-- One entry a batch row, not a task: lets a listing of completed tasks page by time.
CREATE INDEX IF NOT EXISTS completions_queue ON completions (queue, finished_at);

-- Every finished task, one row each, for people and tests (not for hot paths).
CREATE OR REPLACE VIEW results AS
SELECT h.id, h.queue, h.state, h.attempt, h.failures, p.max_attempts, h.result, h.last_error, h.payload,
       h.finished_at
FROM history h LEFT JOIN policies p ON p.id = h.policy
UNION ALL
SELECT u.id, c.queue, 'completed', coalesce(u.attempt, 1), 0, NULL, u.result, NULL, NULL, c.finished_at
FROM completions c CROSS JOIN LATERAL unnest(c.ids, c.attempts, c.results) AS u(id, attempt, result);

-- Partitions for `days` days from `first` (UTC days); safe to run concurrently. Returns how many
-- it made. Brokers keep a few days ahead, so no insert ever finds its partition missing.
CREATE OR REPLACE FUNCTION ensure_partitions(first timestamptz, days integer) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    day timestamptz;
    parent text;
    made integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('conduit partitions ' || current_schema()));
    FOR i IN 0..days - 1 LOOP
        day := date_trunc('day', first, 'UTC') + i * interval '1 day';
        FOREACH parent IN ARRAY ARRAY['history', 'completions'] LOOP
            IF to_regclass(format('%s_%s', parent, to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD'))) IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                               format('%s_%s', parent, to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD')),
                               parent, day, day + interval '1 day');
                made := made + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN made;
END $$;

-- Drop the days that ended before now() - keep, with their counts; expire keys older than that.
-- Returns the partitions dropped.
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

-- Idempotency keys outlive their task's run, so a retried submit finds the first task's id; they
-- expire with the history.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    queue      text NOT NULL,
    key        text NOT NULL,
    task_id    bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);

-- Submit keys name a whole SUBMIT: a client's retry of a batch inserts nothing and gets the first
-- one's ids. One row a batch, where a key on every task would cost a row and an index entry each.
CREATE TABLE IF NOT EXISTS submit_keys (
    key        text PRIMARY KEY,
    ids        bigint[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS submit_keys_created ON submit_keys (created_at);

-- Per-queue counters as append-only deltas, written by the statements that move tasks (no
-- triggers): writers never contend on a counter row, and a reader sums a few rows per queue
-- instead of counting the backlog. compact_counts() folds them.
CREATE TABLE IF NOT EXISTS queue_counts (
    queue text NOT NULL,
    state text NOT NULL,
    n     bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_counts_queue ON queue_counts (queue, state);

-- Paused queues: brokers stop delivering them (submits are still accepted and kept). Each broker
-- rereads the set every keeper tick, and a pause or resume wakes them at once by NOTIFY.
CREATE TABLE IF NOT EXISTS paused_queues (
    queue     text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- Transactional enqueue: an application calls this inside its own transaction, so the task exists
-- exactly when the application's own writes do. Returns the task id (the first task's id when
-- the idempotency key was used before).
CREATE OR REPLACE FUNCTION enqueue(
    queue           text,
    payload         bytea,
    priority        smallint DEFAULT 0,
    delay           double precision DEFAULT 0,
    max_attempts    integer DEFAULT 5,
    idempotency_key text DEFAULT NULL,
    lease_timeout   double precision DEFAULT 30
) RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    new_id bigint := nextval('task_ids');
    old_id bigint;
BEGIN
    IF enqueue.queue !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' THEN
        RAISE EXCEPTION 'queue name % is not valid: 1-64 characters, letters, digits and _ . : -, '
                        'starting with a letter or digit', quote_literal(enqueue.queue)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF idempotency_key IS NOT NULL THEN
        INSERT INTO idempotency_keys AS k (queue, key, task_id)
        VALUES (enqueue.queue, enqueue.idempotency_key, new_id)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT k.task_id INTO old_id FROM idempotency_keys k
            WHERE k.queue = enqueue.queue AND k.key = enqueue.idempotency_key;
            RETURN old_id;
        END IF;
    END IF;
    INSERT INTO tasks (id, queue, payload, priority, run_at, policy, idempotency_key)
    VALUES (new_id, enqueue.queue, enqueue.payload, enqueue.priority,
            now() + enqueue.delay * interval '1 second',
            policy_id(enqueue.max_attempts, enqueue.lease_timeout, 1, 300), enqueue.idempotency_key);
    INSERT INTO queue_counts VALUES (enqueue.queue, 'pending', 1);
    PERFORM pg_notify('conduit_' || current_schema(), enqueue.queue);
    RETURN new_id;
END $$;

INSERT INTO meta (key, value) VALUES ('schema_version', '7'), ('retention_days', '7')
ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE meta.key = 'schema_version';
SELECT ensure_partitions(now(), 3);
