-- Runs recorded from Ansible (tandem.dr.tandem_center_run) are idempotent by keys the caller
-- gives: a run's key is unique, a step's key is unique within its run, so recording the same
-- run or step again is a no-op. A series groups the runs of one operation of one plan (the
-- plan runner's equivalent of its local state file), so that the newest run of a series can
-- be found and an interrupted one resumed.

ALTER TABLE runs
    ADD COLUMN key    text UNIQUE CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    ADD COLUMN series text CHECK (series ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$');
CREATE INDEX runs_series_newest ON runs (series, id DESC) WHERE series IS NOT NULL;

ALTER TABLE run_steps
    ADD COLUMN key text CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    ADD CONSTRAINT run_steps_key_once UNIQUE (run_id, key);
