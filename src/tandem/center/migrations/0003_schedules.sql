-- tandem-center schedules (tandem.center.schedules): periodic recovery points, exactly once.
--
-- One row per (VM, slot) the leader claimed, BEFORE it asks the engine for the RP: the unique
-- keys make a second claim of the same slot impossible, whichever instance leads. The RP's
-- name on the engine is a function of the slot (rp_name), so re-asking for a claimed slot
-- (after a crash between the engine call and the update to 'done') returns the same RP.
--   claimed  the leader took the slot; the RP may or may not exist yet on the engine
--   done     the engine confirmed the RP (recorded in recovery_points too)
--   missed   the slot's window passed without an RP (no leader, engine unreachable, refused)
--   expired  retention deleted the RP from the engine (and from recovery_points)
--   kept     retention wanted it gone but the engine keeps it (labelled, e.g. tested=...)
CREATE TABLE schedule_slots (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_id          bigint NOT NULL REFERENCES protected_vms ON DELETE CASCADE,
    policy_id      bigint NOT NULL REFERENCES protection_policies ON DELETE CASCADE,
    slot_at        timestamptz NOT NULL,            -- a multiple of interval_s since the epoch
    interval_s     integer NOT NULL CHECK (interval_s > 0),
    rp_name        text NOT NULL CHECK (rp_name ~ '^center-[A-Za-z0-9_.:-]{1,74}$'),
    state          text NOT NULL DEFAULT 'claimed'
                   CHECK (state IN ('claimed', 'done', 'missed', 'expired', 'kept')),
    hypervisor_id  bigint REFERENCES hypervisors ON DELETE SET NULL,   -- the engine asked
    claimed_by     text NOT NULL,
    claimed_at     timestamptz NOT NULL DEFAULT now(),
    attempts       integer NOT NULL DEFAULT 0,
    taken_at       timestamptz,                     -- the engine's creation time of the RP
    done_at        timestamptz,
    finished_at    timestamptz,                     -- when it became missed, expired or kept
    error          text,
    CHECK ((state IN ('done', 'expired', 'kept')) = (taken_at IS NOT NULL)),
    UNIQUE (vm_id, slot_at),
    UNIQUE (vm_id, rp_name)
);
CREATE INDEX ON schedule_slots (vm_id, slot_at DESC);
CREATE INDEX ON schedule_slots (slot_at) WHERE state = 'claimed';

-- Who leads the schedules (one row). Informational: the advisory lock decides, this row says
-- who holds it and since when, for the dashboard, /metrics and the failover tests.
CREATE TABLE schedule_leader (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder     text NOT NULL,
    since      timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL
);
