-- Conduit's whole schema, version 2 (queries.sql holds the migrations from earlier versions).
-- `conduit db init` applies it once, inside the schema named by CONDUIT_SCHEMA (default "conduit"),
-- with that schema first on the search_path; unqualified names below land there.

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Live tasks only: pending, buffered by a broker, or running on a worker. Finished tasks move to
-- `results`, so this table stays as small as the live backlog and its indexes stay hot.
CREATE SEQUENCE task_ids AS bigint;

CREATE TABLE tasks (
    id               bigint PRIMARY KEY DEFAULT nextval('task_ids'),
    queue            text NOT NULL,  -- naming rule checked on the way in (a CHECK costs every update)
    priority         smallint NOT NULL DEFAULT 0,          -- lower runs first
    run_at           timestamptz NOT NULL DEFAULT now(),
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'buffered', 'running')),
    attempt          integer NOT NULL DEFAULT 0,           -- fencing token: grows with every lease
    failures         integer NOT NULL DEFAULT 0,           -- failed or abandoned runs
    max_attempts     integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    lease_timeout    double precision NOT NULL DEFAULT 30 CHECK (lease_timeout > 0),
    backoff_base     double precision NOT NULL DEFAULT 1 CHECK (backoff_base >= 0),
    backoff_max      double precision NOT NULL DEFAULT 300 CHECK (backoff_max >= 0),
    broker           text,                                 -- holder while buffered or running
    broker_epoch     bigint,
    worker           text,
    lease_expires_at timestamptz,                          -- task lease, while running
    idempotency_key  text,
    payload          bytea NOT NULL,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'pending') = (broker IS NULL)),
    CHECK ((state = 'running') = (lease_expires_at IS NOT NULL))
);
-- Partial indexes: each serves one hot path and holds only the rows that path reads.
CREATE INDEX tasks_due ON tasks (queue, priority, run_at, id) WHERE state = 'pending';
CREATE INDEX tasks_running ON tasks (lease_expires_at) WHERE state = 'running';
CREATE INDEX tasks_buffered ON tasks (broker, broker_epoch) WHERE state = 'buffered';

-- Finished tasks: completed (with result), dead (after max_attempts, kept whole for redrive) or
-- cancelled. Ids never repeat, so a late complete finds its task here and is refused.
CREATE TABLE results (
    id              bigint PRIMARY KEY,
    queue           text NOT NULL,
    state           text NOT NULL CHECK (state IN ('completed', 'dead', 'cancelled')),
    priority        smallint NOT NULL,
    attempt         integer NOT NULL,
    failures        integer NOT NULL,
    max_attempts    integer NOT NULL,
    lease_timeout   double precision NOT NULL,
    backoff_base    double precision NOT NULL,
    backoff_max     double precision NOT NULL,
    idempotency_key text,
    payload         bytea,                                 -- kept for dead and cancelled tasks only
    result          bytea,
    last_error      text,
    created_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX results_dead ON results (queue, finished_at) WHERE state = 'dead';

-- Idempotency keys outlive their task's run, so a retried submit finds the first task's id.
CREATE TABLE idempotency_keys (
    queue      text NOT NULL,
    key        text NOT NULL,
    task_id    bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, key)
);
CREATE INDEX idempotency_keys_task ON idempotency_keys (task_id);

-- Submit keys name a whole SUBMIT: a client's retry of a batch inserts nothing and gets the first
-- one's ids. One row a batch, where a key on every task would cost a row and an index entry each.
CREATE TABLE submit_keys (
    key        text PRIMARY KEY,
    ids        bigint[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Broker leases: a broker's buffered tasks are its own while its lease is live. The epoch grows at
-- every acquisition, and every buffered-lease write checks it (fencing, as Temporal's range_id).
CREATE TABLE brokers (
    id         text PRIMARY KEY,
    endpoint   text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- Per-queue counters as append-only deltas: writers never contend on a counter row, and a reader
-- sums a few rows per queue instead of counting the backlog. compact_counts() folds them.
CREATE TABLE queue_counts (
    queue text NOT NULL,
    state text NOT NULL,
    n     bigint NOT NULL
);
CREATE INDEX queue_counts_queue ON queue_counts (queue, state);

CREATE FUNCTION count_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_counts SELECT queue, state, count(*) FROM new_rows GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_counts SELECT queue, state, -count(*) FROM old_rows GROUP BY 1, 2;
    ELSE
        INSERT INTO queue_counts
        SELECT queue, state, sum(n) FROM (
            SELECT queue, state, count(*) AS n FROM new_rows GROUP BY 1, 2
            UNION ALL
            SELECT queue, state, -count(*) FROM old_rows GROUP BY 1, 2
        ) d GROUP BY 1, 2 HAVING sum(n) <> 0;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_tasks();
CREATE TRIGGER tasks_count_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_tasks();
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_tasks();
CREATE TRIGGER results_count_insert AFTER INSERT ON results
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_tasks();
CREATE TRIGGER results_count_delete AFTER DELETE ON results
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_tasks();

-- Transactional enqueue: an application calls this inside its own transaction, so the task exists
-- exactly when the application's own writes do. Returns the task id (the first task's id when
-- the idempotency key was used before).
CREATE FUNCTION enqueue(
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
    INSERT INTO tasks (id, queue, payload, priority, run_at, max_attempts, idempotency_key, lease_timeout)
    VALUES (new_id, enqueue.queue, enqueue.payload, enqueue.priority,
            now() + enqueue.delay * interval '1 second', enqueue.max_attempts,
            enqueue.idempotency_key, enqueue.lease_timeout);
    PERFORM pg_notify('conduit_' || current_schema(), enqueue.queue);
    RETURN new_id;
END $$;

INSERT INTO meta (key, value) VALUES ('schema_version', '2');
