"""The catalog's schema as forward-only migrations; `meta.schema_version` records the last applied.

Table and column names are part of the user interface (README, "SQL tables"): add, never rename.
"""

MIGRATIONS: list[str] = [
    # 1: the engine, the item caches and the description tables
    """
    CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
    CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY, key VARCHAR NOT NULL, stage VARCHAR NOT NULL,
        target VARCHAR NOT NULL, code_version VARCHAR NOT NULL, params JSON, locators JSON,
        inputs JSON, request JSON, output VARCHAR, status VARCHAR NOT NULL, started_at TIMESTAMP,
        finished_at TIMESTAMP, seconds DOUBLE, pid INTEGER, error VARCHAR, summary JSON);
    CREATE TABLE artifacts (
        digest VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, path VARCHAR NOT NULL,
        file_sha256 VARCHAR NOT NULL, bytes BIGINT, created_at TIMESTAMP, meta JSON);
    CREATE TABLE file_digests (
        path VARCHAR PRIMARY KEY, size BIGINT, mtime_ns BIGINT, sha256 VARCHAR);
    CREATE TABLE classes (
        dataset VARCHAR, class_id INTEGER, raw_name VARCHAR, name VARCHAR,
        PRIMARY KEY (dataset, class_id));
    CREATE TABLE llm_requests (
        attempt_id VARCHAR PRIMARY KEY, request_key VARCHAR NOT NULL, created_at TIMESTAMP,
        dataset VARCHAR, class_name VARCHAR, kind VARCHAR, model VARCHAR, endpoint_host VARCHAR,
        messages JSON, params JSON, response_format VARCHAR, response VARCHAR,
        finish_reason VARCHAR, prompt_tokens INTEGER, completion_tokens INTEGER,
        latency_s DOUBLE, status VARCHAR, error VARCHAR);
    CREATE TABLE llm_endpoints (
        endpoint_host VARCHAR, model VARCHAR, json_schema BOOLEAN, checked_at TIMESTAMP,
        PRIMARY KEY (endpoint_host, model));
    CREATE TABLE descriptions (
        dataset VARCHAR, class_id INTEGER, class_name VARCHAR, kind VARCHAR, idx INTEGER,
        phrase VARCHAR, text VARCHAR, n_tokens INTEGER, request_key VARCHAR, problems VARCHAR[],
        PRIMARY KEY (dataset, class_id, kind, idx));
    CREATE TABLE description_failures (
        dataset VARCHAR, kind VARCHAR, class_id INTEGER, class_name VARCHAR, reason VARCHAR,
        run_id VARCHAR);
    CREATE TABLE text_embedding_files (
        dataset VARCHAR, backbone VARCHAR, artifact VARCHAR, path VARCHAR, dim INTEGER,
        PRIMARY KEY (dataset, backbone));
    """,
    # 2: the video side
    """
    CREATE TABLE frame_clips (
        entry_key VARCHAR PRIMARY KEY, video VARCHAR, size BIGINT, mtime_ns BIGINT,
        sampling JSON, shape INTEGER[], path VARCHAR, bytes BIGINT, format VARCHAR,
        created_at TIMESTAMP);
    CREATE TABLE frame_index (
        target VARCHAR, artifact VARCHAR, dataset VARCHAR, list VARCHAR, video VARCHAR, label INTEGER,
        entry_key VARCHAR);
    CREATE TABLE frame_failures (
        dataset VARCHAR, list VARCHAR, video VARCHAR, error VARCHAR, run_id VARCHAR,
        created_at TIMESTAMP);
    CREATE VIEW frames AS
        SELECT i.dataset, i.list, i.video, i.label, c.sampling, c.shape, c.format, c.bytes,
               c.path AS clip_path, i.target, i.artifact
        FROM frame_index i JOIN frame_clips c USING (entry_key);
    """,
    # 3: training and evaluation
    """
    CREATE TABLE epochs (
        run_key VARCHAR, epoch INTEGER, lr DOUBLE, loss DOUBLE, ce DOUBLE, cc DOUBLE,
        train_acc DOUBLE, heldout_acc DOUBLE, seconds DOUBLE, PRIMARY KEY (run_key, epoch));
    CREATE TABLE results (
        run_key VARCHAR, protocol VARCHAR, dataset VARCHAR, split VARCHAR, metric VARCHAR,
        value DOUBLE, views VARCHAR, checkpoint_digest VARCHAR, selection VARCHAR,
        eval_key VARCHAR, created_at TIMESTAMP,
        PRIMARY KEY (run_key, dataset, split, metric, selection));
    CREATE TABLE class_accuracy (
        eval_key VARCHAR, run_key VARCHAR, dataset VARCHAR, split VARCHAR, selection VARCHAR,
        class_id INTEGER, class_name VARCHAR, videos INTEGER, accuracy DOUBLE);
    """,
    # 4: a digest per cached clip, so that an altered clip file is a miss (NULL: registered before)
    """
    ALTER TABLE frame_clips ADD COLUMN sha256 VARCHAR;
    """,
    # 5: video embeddings of a list (the `features` stage; view video_embeddings), and what
    #    `predict --save` keeps
    """
    CREATE TABLE video_embedding_files (
        target VARCHAR PRIMARY KEY, dataset VARCHAR, list VARCHAR, model VARCHAR, selection VARCHAR,
        backbone VARCHAR, artifact VARCHAR, path VARCHAR, dim INTEGER);
    CREATE TABLE predictions (
        created_at TIMESTAMP, model VARCHAR, video VARCHAR, rank INTEGER, class_id INTEGER,
        class_name VARCHAR, prob DOUBLE, views VARCHAR, error VARCHAR);
    CREATE VIEW video_embeddings AS
    SELECT NULL::VARCHAR AS dataset, NULL::VARCHAR AS list, NULL::VARCHAR AS model, NULL::VARCHAR AS run_key,
           NULL::VARCHAR AS selection, NULL::VARCHAR AS backbone, NULL::VARCHAR AS video,
           NULL::INTEGER AS label, NULL::VARCHAR AS class_name, NULL::VARCHAR AS level, NULL::INTEGER AS view,
           NULL::INTEGER AS clip, NULL::INTEGER AS crop, NULL::FLOAT[] AS embedding
    WHERE false;
    """,
    # 6: params as plain JSON (numbers as numbers, for params->>'alpha' in SQL; keys keep their own
    #    canonical encoding), and each run's configuration: what report groups by and what
    #    `gc --superseded` compares (NULL: a run from before, never treated as superseded)
    r"""
    UPDATE runs SET params = regexp_replace(params::VARCHAR, '\{"__float__":"([^"]*)"\}', '\1', 'g')::JSON;
    ALTER TABLE runs ADD COLUMN configuration VARCHAR;
    """,
    # 7: a frame index's own facts once, in frame_lists, and only what differs per video in frame_index
    #    (the `frames` view, the interface, keeps its columns): at registration DuckDB holds the rows
    #    being inserted uncompressed, and the three columns alike on every row of a list were half
    #    of them (benchmarks/scale.py). frame_index was never documented; an older msta-pipe's
    #    `sql` cannot bind its `frames` view on a migrated catalog.
    """
    CREATE TABLE frame_lists (target VARCHAR PRIMARY KEY, artifact VARCHAR, dataset VARCHAR, list VARCHAR);
    INSERT INTO frame_lists SELECT target, any_value(artifact), any_value(dataset), any_value(list)
        FROM frame_index WHERE target IS NOT NULL GROUP BY target;
    DROP VIEW IF EXISTS frames;
    ALTER TABLE frame_index DROP COLUMN artifact;
    ALTER TABLE frame_index DROP COLUMN dataset;
    ALTER TABLE frame_index DROP COLUMN list;
    CREATE VIEW frames AS
        SELECT l.dataset, l.list, i.video, i.label, c.sampling, c.shape, c.format, c.bytes,
               c.path AS clip_path, i.target, l.artifact
        FROM frame_index i JOIN frame_lists l USING (target) JOIN frame_clips c USING (entry_key);
    """,
    # 8: frame_clips without its primary key. DuckDB loads a key's index to check every insert, so
    #    each 64-clip commit cost more the more clips were cached (+5 MB at 1.6k, +15 MB at 64k;
    #    +1 MB flat without it); `frames` keeps the keys unique itself (stages/frames.py)
    """
    CREATE TABLE frame_clips_unkeyed AS SELECT * FROM frame_clips;
    DROP VIEW IF EXISTS frames;
    DROP TABLE frame_clips;
    ALTER TABLE frame_clips_unkeyed RENAME TO frame_clips;
    ALTER TABLE frame_clips ALTER COLUMN entry_key SET NOT NULL;
    CREATE VIEW frames AS
        SELECT l.dataset, l.list, i.video, i.label, c.sampling, c.shape, c.format, c.bytes,
               c.path AS clip_path, i.target, l.artifact
        FROM frame_index i JOIN frame_lists l USING (target) JOIN frame_clips c USING (entry_key);
    """,
    # 9: a frame index only in its Parquet artifact, which frame_lists now names by path (as the
    #    embedding tables do); the `frames` view reads it there (cache.views). Copying a 240k list
    #    into frame_index held all of its rows in memory until the commit (+46 MB), and the
    #    artifact already held every one of them.
    """
    ALTER TABLE frame_lists ADD COLUMN path VARCHAR;
    UPDATE frame_lists SET path = a.path FROM artifacts a WHERE a.digest = frame_lists.artifact;
    DROP VIEW IF EXISTS frames;
    DROP TABLE frame_index;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

EMPTY_TEXT_EMBEDDINGS = """
CREATE OR REPLACE VIEW text_embeddings AS
SELECT NULL::VARCHAR AS dataset, NULL::VARCHAR AS backbone, NULL::VARCHAR AS level,
       NULL::INTEGER AS class_id, NULL::VARCHAR AS class_name, NULL::VARCHAR AS kind,
       NULL::INTEGER AS idx, NULL::VARCHAR AS text, NULL::VARCHAR AS text_sha256,
       NULL::FLOAT[] AS embedding
WHERE false
"""
