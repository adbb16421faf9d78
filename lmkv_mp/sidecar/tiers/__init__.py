"""Lower tiers (disk, Redis/Valkey) behind one Tier protocol, their mover threads and the
policy that moves chunks between them and the host tier."""
