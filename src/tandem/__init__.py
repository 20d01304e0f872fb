"""tandem: stdlib-only engine behind the tandem.dr Ansible collection."""

__version__ = "0.1.0"
