-- tandem-center control-plane state (tandem.center.control_plane): one row, written by the
-- instances whose database is the writable primary.
CREATE TABLE cp_state (
    id                  boolean PRIMARY KEY DEFAULT true CHECK (id),     -- exactly one row
    vip                 text,            -- the VIP these holders are of ([control_plane] vip)
    vip_holder          text,            -- the node whose instance last saw the VIP on its interfaces
    vip_holder_since    timestamptz,
    vip_expected        text,            -- the holder last acknowledged (at first: the first seen)
    -- Each node's last check of the witness (the pg_auto_failover monitor):
    -- {"cp-a": {"reachable": true | false | null, "error": "...", "at": EPOCH}}; null: failing, not
    -- yet for witness_down_after.
    witness             jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(witness) = 'object'),
    formation           jsonb CHECK (formation IS NULL OR jsonb_typeof(formation) = 'array'),
                                         -- the monitor's nodes as last read: name, reported/goal state
    updated_at          timestamptz NOT NULL DEFAULT now(),
    updated_by          text             -- the node name of the instance that wrote last
);
INSERT INTO cp_state DEFAULT VALUES;
