"""tandemd: the Tandem DR replication engine (standard library only).

Hypervisors install it offline, so nothing here may import a third-party
package. See docs/engine.md for the design and where it differs from DRBD.
"""
